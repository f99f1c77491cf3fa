//! A line logger the board sets once (semihosting on QEMU, nothing on a Teensy without a
//! debugger); the [`info!`](crate::info) macro writes through it.

use core::fmt;
use core::sync::atomic::{AtomicPtr, Ordering};

/// A sink for one formatted log line (without the newline).
pub type Sink = fn(fmt::Arguments<'_>);

fn discard(_: fmt::Arguments<'_>) {}

static SINK: AtomicPtr<()> = AtomicPtr::new(discard as *mut ());

/// Sets where log lines go.
pub fn set_sink(sink: Sink) {
    SINK.store(sink as *mut (), Ordering::Release);
}

/// Writes one line to the sink.
pub fn write(args: fmt::Arguments<'_>) {
    let ptr = SINK.load(Ordering::Acquire);
    // SAFETY: SINK only ever holds a `Sink` function pointer (the initial `discard` or one
    // stored by `set_sink`).
    let sink: Sink = unsafe { core::mem::transmute::<*mut (), Sink>(ptr) };
    sink(args);
}

/// Logs one line: `info!("x = {}", x)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write(format_args!($($arg)*)) };
}
