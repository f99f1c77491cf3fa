//! embassy-time driver: time from the MPS2's CMSDK APB timer 0 (a 32-bit down-counter at the
//! 25 MHz peripheral clock, 0x4000_0000), extended to 64 bits; a 1 kHz SysTick interrupt runs
//! the timer queue (so a timer fires at most 1 ms late) and lets the Ethernet driver check its
//! RX FIFO (the board's Ethernet interrupt is not used). embassy's tick is 1 µs.
//!
//! Time is not counted in SysTick interrupts: when the host is busy, QEMU's vCPU can be
//! descheduled for several periods and the coalesced interrupts lose ticks (measured: the
//! firmware's clock ran about 3× slow on a loaded 2-core machine). The counter keeps virtual
//! time; it wraps every 171 s and is read at least every tick, so no wrap is missed.

use core::cell::{Cell, RefCell};
use core::ptr::{read_volatile, write_volatile};
use core::task::Waker;

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use critical_section::Mutex;
use embassy_time_driver::Driver;
use embassy_time_queue_utils::Queue;

/// SysTick's and the APB timers' clock on QEMU's MPS2 boards.
pub const CPU_HZ: u32 = 25_000_000;
const TICK_HZ: u32 = 1_000;
const RELOAD: u32 = CPU_HZ / TICK_HZ - 1;
const CYCLES_PER_US: u32 = CPU_HZ / 1_000_000;

/// CMSDK APB timer 0: CTRL, VALUE, RELOAD.
const TIMER0_CTRL: *mut u32 = 0x4000_0000 as *mut u32;
const TIMER0_VALUE: *mut u32 = 0x4000_0004 as *mut u32;
const TIMER0_RELOAD: *mut u32 = 0x4000_0008 as *mut u32;

struct SysTickDriver {
    /// Timer 0 wraps seen, and the elapsed count at the last read.
    wraps: Mutex<Cell<(u32, u32)>>,
    queue: Mutex<RefCell<Queue>>,
}

embassy_time_driver::time_driver_impl!(static DRIVER: SysTickDriver = SysTickDriver {
    wraps: Mutex::new(Cell::new((0, 0))),
    queue: Mutex::new(RefCell::new(Queue::new())),
});

/// Starts the clock (timer 0, free-running) and the 1 kHz tick.
pub fn init(mut syst: SYST) {
    // SAFETY: timer 0 is this driver's alone; word-aligned device registers.
    unsafe {
        write_volatile(TIMER0_CTRL, 0);
        write_volatile(TIMER0_RELOAD, u32::MAX);
        write_volatile(TIMER0_VALUE, u32::MAX);
        write_volatile(TIMER0_CTRL, 1);
    }
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

impl Driver for SysTickDriver {
    fn now(&self) -> u64 {
        critical_section::with(|cs| {
            let cell = self.wraps.borrow(cs);
            let (mut wraps, last) = cell.get();
            // SAFETY: a read of the counter register.
            let elapsed = u32::MAX - unsafe { read_volatile(TIMER0_VALUE) };
            if elapsed < last {
                wraps = wraps.wrapping_add(1);
            }
            cell.set((wraps, elapsed));
            ((u64::from(wraps) << 32) | u64::from(elapsed)) / u64::from(CYCLES_PER_US)
        })
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        critical_section::with(|cs| {
            self.queue.borrow(cs).borrow_mut().schedule_wake(at, waker);
        });
        // Due already: the next tick fires it (at most 1 ms late), nothing to arm.
    }
}

#[exception]
fn SysTick() {
    let now = DRIVER.now();
    critical_section::with(|cs| {
        DRIVER.queue.borrow(cs).borrow_mut().next_expiration(now);
    });
    crate::lan9118::poll_wake(crate::lan9118::BASE);
}
