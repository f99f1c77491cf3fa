//! embassy-time driver on GPT1: free-running at PERCLK (1 MHz on the teensy4-bsp clock
//! policy, so one GPT count is one embassy tick), extended to 64 bits by its rollover
//! interrupt. Output compare 2 is the alarm: armed at the earliest timer in the queue, so a
//! task wakes within microseconds of its time; output compare 1 gives a 1 kHz tick that also
//! runs the queue (a fallback for an alarm armed too late to fire) and the periodic wake-ups
//! of the Ethernet driver (PHY link polling).

use core::cell::{Cell, RefCell};
use core::task::Waker;

use critical_section::Mutex;
use embassy_time_driver::Driver;
use embassy_time_queue_utils::Queue;
use teensy4_bsp::board;
use teensy4_bsp::hal::gpt::{ClockSource, Gpt, Mode, OutputCompareRegister};

const _: () = assert!(
    board::PERCLK_FREQUENCY == 1_000_000,
    "GPT1 ticks must be microseconds"
);
const TICK_US: u32 = 1_000;

struct GptDriver {
    /// Rollovers of the 32-bit counter seen so far.
    high: Mutex<Cell<u32>>,
    gpt: Mutex<RefCell<Option<Gpt>>>,
    queue: Mutex<RefCell<Queue>>,
}

embassy_time_driver::time_driver_impl!(static DRIVER: GptDriver = GptDriver {
    high: Mutex::new(Cell::new(0)),
    gpt: Mutex::new(RefCell::new(None)),
    queue: Mutex::new(RefCell::new(Queue::new())),
});

/// Takes GPT1 (from `board::t41`) and starts the clock.
pub fn init(mut gpt: Gpt) {
    gpt.disable();
    gpt.set_clock_source(ClockSource::PeripheralClock);
    gpt.set_divider(1);
    gpt.set_mode(Mode::FreeRunning);
    gpt.set_reset_on_enable(true);
    gpt.set_wait_mode_enable(true);
    gpt.set_rollover_interrupt_enable(true);
    gpt.set_output_compare_count(OutputCompareRegister::OCR1, TICK_US);
    gpt.set_output_interrupt_on_compare(OutputCompareRegister::OCR1, true);
    gpt.enable();
    critical_section::with(|cs| DRIVER.gpt.borrow(cs).replace(Some(gpt)));
    // SAFETY: the handler below only touches state behind critical sections.
    unsafe { cortex_m::peripheral::NVIC::unmask(teensy4_bsp::Interrupt::GPT1) };
}

impl Driver for GptDriver {
    fn now(&self) -> u64 {
        critical_section::with(|cs| {
            let gpt = self.gpt.borrow(cs).borrow();
            let Some(gpt) = gpt.as_ref() else { return 0 };
            let mut high = self.high.borrow(cs).get();
            let mut low = gpt.count();
            // Rolled over since the handler last ran: count it here (the handler will too).
            if gpt.is_rollover() {
                high = high.wrapping_add(1);
                low = gpt.count();
            }
            (u64::from(high) << 32) | u64::from(low)
        })
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        critical_section::with(|cs| {
            let mut queue = self.queue.borrow(cs).borrow_mut();
            if queue.schedule_wake(at, waker) {
                let now = self.now();
                let next = queue.next_expiration(now);
                arm(&self.gpt.borrow(cs).borrow(), now, next);
            }
        });
    }
}

/// The GPT1 interrupt vector (imxrt-ral's `rt` table names it).
/// Arms output compare 2 at `next` (µs) when it is due within the counter's half range;
/// anything later is left to the 1 kHz tick, which re-arms as it comes closer.
fn arm(gpt: &Option<Gpt>, now: u64, next: u64) {
    let Some(gpt) = gpt.as_ref() else { return };
    let due = next.saturating_sub(now) < u64::from(u32::MAX / 2);
    if due {
        gpt.set_output_compare_count(OutputCompareRegister::OCR2, next as u32);
        gpt.clear_elapsed(OutputCompareRegister::OCR2);
    }
    // `set_output_interrupt_on_compare` needs `&mut`; the IR register bit is set through
    // the RAL instead (GPT1 is this driver's alone).
    // SAFETY: a read-modify-write of GPT1's interrupt register inside a critical section.
    let regs = unsafe { teensy4_bsp::ral::gpt::GPT1::instance() };
    teensy4_bsp::ral::modify_reg!(teensy4_bsp::ral::gpt, regs, IR, OF2IE: u32::from(due));
}

#[unsafe(no_mangle)]
extern "C" fn GPT1() {
    let now = critical_section::with(|cs| {
        let gpt = DRIVER.gpt.borrow(cs).borrow();
        let gpt = gpt.as_ref()?;
        if gpt.is_rollover() {
            gpt.clear_rollover();
            let high = DRIVER.high.borrow(cs);
            high.set(high.get().wrapping_add(1));
        }
        if gpt.is_elapsed(OutputCompareRegister::OCR2) {
            gpt.clear_elapsed(OutputCompareRegister::OCR2);
        }
        if gpt.is_elapsed(OutputCompareRegister::OCR1) {
            gpt.clear_elapsed(OutputCompareRegister::OCR1);
            let next = gpt
                .output_compare_count(OutputCompareRegister::OCR1)
                .wrapping_add(TICK_US);
            gpt.set_output_compare_count(OutputCompareRegister::OCR1, next);
        }
        Some(())
    });
    if now.is_none() {
        return;
    }
    let now = DRIVER.now();
    critical_section::with(|cs| {
        let next = DRIVER.queue.borrow(cs).borrow_mut().next_expiration(now);
        arm(&DRIVER.gpt.borrow(cs).borrow(), now, next);
    });
    crate::enet::tick(now);
}
