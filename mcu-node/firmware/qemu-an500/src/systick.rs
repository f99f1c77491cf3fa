//! embassy-time driver: time from the MPS2's CMSDK APB timer 0 (a 32-bit down-counter at the
//! 25 MHz peripheral clock, 0x4000_0000), extended to 64 bits. CMSDK APB timer 1
//! (0x4000_1000, IRQ 9) is the alarm: a one-shot countdown to the queue's earliest timer, so a
//! task wakes at its time. A 1 kHz SysTick interrupt lets the Ethernet driver check its RX FIFO
//! (the board's Ethernet interrupt is not used) and runs the queue too, as a fallback.
//! embassy's tick is 1 µs.
//!
//! Why an alarm: with the queue run only by the tick, a timer fired on the first tick after
//! its time, and QEMU delivers the 1 kHz SysTick late too (measured in the QEMU test: DAC
//! writes 1.6–1.8 ms after their deadline on an idle host, several ms under load). With the
//! alarm, and the WFI idle loop (main.rs), the note's timer wakes 50–85 µs after it.
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
/// CMSDK APB timer 1 (the alarm): CTRL, VALUE, RELOAD, INTSTATUS/INTCLEAR; its NVIC line.
const TIMER1_CTRL: *mut u32 = 0x4000_1000 as *mut u32;
const TIMER1_VALUE: *mut u32 = 0x4000_1004 as *mut u32;
const TIMER1_RELOAD: *mut u32 = 0x4000_1008 as *mut u32;
const TIMER1_INTCLEAR: *mut u32 = 0x4000_100C as *mut u32;
const TIMER1_IRQ: i16 = 9;
/// CTRL bits: enable, interrupt enable.
const CTRL_EN: u32 = 1;
const CTRL_IRQ_EN: u32 = 1 << 3;
/// NVIC interrupt set-enable register 0.
const NVIC_ISER0: *mut u32 = 0xE000_E100 as *mut u32;
/// The alarm's longest countdown (the tick re-arms it as later timers come closer).
const MAX_ALARM_US: u64 = 1_000_000;

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
        write_volatile(TIMER0_CTRL, CTRL_EN);
        write_volatile(TIMER1_CTRL, 0);
        write_volatile(TIMER1_RELOAD, u32::MAX);
        write_volatile(TIMER1_INTCLEAR, 1);
        write_volatile(NVIC_ISER0, 1 << TIMER1_IRQ);
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
            if self.queue.borrow(cs).borrow_mut().schedule_wake(at, waker) {
                self.run_queue(cs);
            }
        });
    }
}

impl SysTickDriver {
    /// Wakes every due timer and arms the alarm at the earliest one left.
    fn run_queue(&self, cs: critical_section::CriticalSection<'_>) {
        let now = self.now();
        let next = self.queue.borrow(cs).borrow_mut().next_expiration(now);
        // `next_expiration` woke everything due by `now`: `next` is later (or never).
        let us = next.saturating_sub(now).clamp(1, MAX_ALARM_US);
        // SAFETY: timer 1 is this driver's alone; word-aligned device registers.
        unsafe {
            write_volatile(TIMER1_CTRL, 0);
            write_volatile(TIMER1_INTCLEAR, 1);
            if next != u64::MAX {
                write_volatile(TIMER1_VALUE, us as u32 * CYCLES_PER_US);
                write_volatile(TIMER1_CTRL, CTRL_EN | CTRL_IRQ_EN);
            }
        }
    }
}

#[exception]
fn SysTick() {
    critical_section::with(|cs| DRIVER.run_queue(cs));
    crate::lan9118::poll_wake(crate::lan9118::BASE);
}

/// Every external interrupt lands here (cortex-m-rt's default vector table); only the alarm's
/// is enabled.
#[exception]
unsafe fn DefaultHandler(irqn: i16) {
    if irqn == TIMER1_IRQ {
        critical_section::with(|cs| DRIVER.run_queue(cs));
    }
}
