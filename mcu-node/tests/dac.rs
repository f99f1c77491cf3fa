//! Byte-exact I2C transactions of the DAC drivers against their datasheets, with
//! embedded-hal-mock (the mock fails the test on any byte, address or order that differs).

use embedded_hal::i2c::ErrorKind;
use embedded_hal_mock::eh1::delay::{CheckedDelay, Transaction as D};
use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
use voicemesh_mcu::dac::{Ad5593r, Dac, INIT_RETRY_US, Mcp4728, ad5593r, mcp4728};

fn ad5593r_init(addr: u8) -> Vec<T> {
    vec![
        T::write(addr, vec![0x0f, 0x0d, 0xac]), // software reset: 0x0DAC → register 0x0F
        T::write(addr, vec![0x0b, 0x02, 0x00]), // power/ref: EN_REF (bit 9)
        T::write(addr, vec![0x03, 0x00, 0x10]), // GP control: DAC range 2×Vref (bit 4)
        T::write(addr, vec![0x07, 0x00, 0x00]), // LDAC mode 0: write updates the output
        T::write(addr, vec![0x05, 0x00, 0xff]), // DAC pin config: all 8 pins are DACs
    ]
}

#[tokio::test]
async fn ad5593r_init_and_channel_writes_are_byte_exact() {
    let mut expect = ad5593r_init(0x10);
    expect.extend([
        T::write(0x10, vec![0x10, 0x0f, 0xff]), // channel 0, code 4095
        T::write(0x10, vec![0x17, 0x08, 0x00]), // channel 7, code 2048
        T::write(0x10, vec![0x13, 0x00, 0x01]), // channel 3, code 1
        T::write(0x10, vec![0x12, 0x0f, 0xff]), // codes above 12 bits are clamped
    ]);
    let mut i2c = Mock::new(&expect);
    let mut delay = CheckedDelay::new(&[D::async_delay_us(ad5593r::RESET_US)]);
    let mut dac = Ad5593r::new(i2c.clone(), ad5593r::ADDRESS_A0_LOW);
    dac.init(&mut delay).await.unwrap();
    dac.write(0, 4095).await.unwrap();
    dac.write(7, 2048).await.unwrap();
    dac.write(3, 1).await.unwrap();
    dac.write(2, 0xffff).await.unwrap();
    i2c.done();
    delay.done();
}

#[tokio::test]
async fn ad5593r_init_is_retried_then_gives_up() {
    // First attempt: the reset is NAKed (chip not powered yet); second attempt succeeds.
    let mut expect = vec![T::write(0x11, vec![0x0f, 0x0d, 0xac]).with_error(ErrorKind::Other)];
    expect.extend(ad5593r_init(0x11));
    let mut i2c = Mock::new(&expect);
    let mut delay = CheckedDelay::new(&[
        D::async_delay_us(INIT_RETRY_US),
        D::async_delay_us(ad5593r::RESET_US),
    ]);
    Ad5593r::new(i2c.clone(), ad5593r::ADDRESS_A0_HIGH)
        .init(&mut delay)
        .await
        .unwrap();
    i2c.done();
    delay.done();

    // Three NAKs in a row: reported failed after exactly three attempts.
    let nak = T::write(0x10, vec![0x0f, 0x0d, 0xac]).with_error(ErrorKind::Other);
    let mut i2c = Mock::new(&[nak.clone(), nak.clone(), nak]);
    let mut delay = CheckedDelay::new(&[
        D::async_delay_us(INIT_RETRY_US),
        D::async_delay_us(INIT_RETRY_US),
    ]);
    let e = Ad5593r::new(i2c.clone(), 0x10).init(&mut delay).await;
    assert!(e.is_err());
    i2c.done();
    delay.done();
}

#[tokio::test]
async fn mcp4728_init_multi_write_and_fast_write_are_byte_exact() {
    let a = mcp4728::DEFAULT_ADDRESS;
    let expect = [
        T::write(a, vec![0x8f]),       // VREF: all channels internal 2.048 V
        T::write(a, vec![0xcf]),       // gain: all channels ×2
        T::write(a, vec![0xa0, 0x00]), // power-down bits: all normal
        // multi-write 0x40 | ch<<1 | UDAC(0), then [VREF PD1 PD0 GX D11..D8][D7..D0]
        T::write(a, vec![0x40, 0x9f, 0xff]), // channel A, 4095
        T::write(a, vec![0x46, 0x98, 0x00]), // channel D, 2048
        T::write(a, vec![0x42, 0x90, 0x01]), // channel B, 1
        // fast write: [0 0 PD1 PD0 D11..D8][D7..D0] × 4
        T::write(a, vec![0x00, 0x00, 0x04, 0x00, 0x08, 0x00, 0x0f, 0xff]),
    ];
    let mut i2c = Mock::new(&expect);
    let mut delay = CheckedDelay::new(&[]);
    let mut dac = Mcp4728::new(i2c.clone(), a);
    dac.init(&mut delay).await.unwrap();
    dac.write(0, 4095).await.unwrap();
    dac.write(3, 2048).await.unwrap();
    dac.write(1, 1).await.unwrap();
    dac.write_all([0, 1024, 2048, 4095]).await.unwrap();
    i2c.done();
    delay.done();
}

#[tokio::test]
async fn mcp4728_init_retries() {
    let a = 0x61;
    let expect = [
        T::write(a, vec![0x8f]),
        T::write(a, vec![0xcf]).with_error(ErrorKind::Other),
        T::write(a, vec![0x8f]),
        T::write(a, vec![0xcf]),
        T::write(a, vec![0xa0, 0x00]),
    ];
    let mut i2c = Mock::new(&expect);
    let mut delay = CheckedDelay::new(&[D::async_delay_us(INIT_RETRY_US)]);
    Mcp4728::new(i2c.clone(), a).init(&mut delay).await.unwrap();
    i2c.done();
    delay.done();
}
