//! Semihosting: log lines on the host's stdout, the command line (`-append`), and exit codes.

use core::fmt;

use cortex_m_semihosting::{debug, hio};

/// Writes one log line to the host's stdout (semihosting `SYS_WRITE` on handle 1).
pub fn log_line(args: fmt::Arguments<'_>) {
    // Buffer the line so it reaches the host in one call (one trap per line, never split).
    let mut line: heapless::String<256> = heapless::String::new();
    if fmt::write(&mut line, args).is_err() {
        // Too long: what fits, marked.
        line.truncate(250);
        let _ = line.push_str(" [...]");
    }
    let _ = line.push('\n');
    critical_section::with(|_| {
        if let Ok(mut out) = hio::hstdout() {
            let _ = out.write_all(line.as_bytes());
        }
    });
}

/// The semihosting command line (QEMU: the `-append` text, after the program name), or
/// `None` when the host gives none.
pub fn cmdline(buf: &mut [u8]) -> Option<&str> {
    // SYS_GET_CMDLINE takes [buffer address, buffer length] and writes back the length.
    let mut block = [buf.as_mut_ptr() as usize, buf.len()];
    // SAFETY: the block points at a live, writable buffer of the stated length.
    let rc = unsafe {
        cortex_m_semihosting::syscall1(
            cortex_m_semihosting::nr::GET_CMDLINE,
            block.as_mut_ptr() as usize,
        )
    };
    if rc != 0 {
        return None;
    }
    let len = block[1].min(buf.len());
    core::str::from_utf8(&buf[..len]).ok()
}

/// The host's clock in seconds since 1970 (semihosting `SYS_TIME`); 0 when unavailable.
pub fn host_time() -> u64 {
    // SAFETY: SYS_TIME takes no argument block.
    let t = unsafe { cortex_m_semihosting::syscall1(cortex_m_semihosting::nr::TIME, 0) };
    t as u64
}

/// Ends the emulation with `code` (0 success).
pub fn exit(code: u32) -> ! {
    if code == 0 {
        debug::exit(debug::EXIT_SUCCESS);
    } else {
        debug::exit(debug::EXIT_FAILURE);
    }
    loop {
        cortex_m::asm::wfi();
    }
}
