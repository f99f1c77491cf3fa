//! embassy-time driver on the Cortex-M SysTick: a 1 kHz interrupt counts milliseconds, and the
//! current count-down value gives the microseconds in between (embassy's tick is 1 µs).
//!
//! Every tick the handler runs the timer queue (so a timer fires at most 1 ms late) and lets
//! the Ethernet driver check its RX FIFO (the board's Ethernet interrupt is not used).

use core::cell::{Cell, RefCell};
use core::task::Waker;

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{SCB, SYST};
use cortex_m_rt::exception;
use critical_section::Mutex;
use embassy_time_driver::Driver;
use embassy_time_queue_utils::Queue;

/// SysTick input clock on QEMU's MPS2 boards (the CPU clock).
pub const CPU_HZ: u32 = 25_000_000;
const TICK_HZ: u32 = 1_000;
const RELOAD: u32 = CPU_HZ / TICK_HZ - 1;
const CYCLES_PER_US: u32 = CPU_HZ / 1_000_000;

struct SysTickDriver {
    ms: Mutex<Cell<u64>>,
    queue: Mutex<RefCell<Queue>>,
}

embassy_time_driver::time_driver_impl!(static DRIVER: SysTickDriver = SysTickDriver {
    ms: Mutex::new(Cell::new(0)),
    queue: Mutex::new(RefCell::new(Queue::new())),
});

/// Starts the 1 kHz tick.
pub fn init(mut syst: SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(RELOAD);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

impl Driver for SysTickDriver {
    fn now(&self) -> u64 {
        critical_section::with(|cs| {
            let mut ms = self.ms.borrow(cs).get();
            let mut val = SYST::get_current();
            // A wrap since the last handler run: the interrupt is pending, not yet counted.
            if SCB::is_pendst_pending() {
                ms += 1;
                val = SYST::get_current();
            }
            ms * 1_000 + u64::from((RELOAD - val) / CYCLES_PER_US)
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
    let now = critical_section::with(|cs| {
        let ms = DRIVER.ms.borrow(cs);
        ms.set(ms.get() + 1);
        ms.get() * 1_000
    });
    critical_section::with(|cs| {
        DRIVER.queue.borrow(cs).borrow_mut().next_expiration(now);
    });
    crate::lan9118::poll_wake(crate::lan9118::BASE);
}
