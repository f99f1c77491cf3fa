//! The `qemu-an500` firmware as a networked cluster member: QEMU's Cortex-M7 board `mps2-an500`
//! runs the real firmware image, its LAN9118 attached to a TAP device inside a network
//! namespace of the test's own, where Linux processes reach it over UDP and mDNS.
//!
//! Needs `qemu-system-arm` (Debian `qemu-system-arm`) and the firmware image, built by
//! `scripts/test-all.sh` before the tests (`VOICEMESH_FW_QEMU` names it; default: the
//! firmware's own target dir). Either missing is a loud failure.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use voicemesh_protocol::datagram::{
    DatagramHeader, MAX_DATAGRAM_LEN, decode_datagram, encode_datagram,
};
use voicemesh_protocol::{ClusterTime, Heartbeat, Message, Role};
use voicemesh_tests::{Child, Netns, python};

/// The namespace's side of the TAP link and the firmware's static address.
const HOST_ADDR: &str = "10.77.0.1";
const FW_ADDR: &str = "10.77.0.2";
const FW_PORT: u16 = 7410;

fn firmware_image() -> PathBuf {
    let path = std::env::var_os("VOICEMESH_FW_QEMU").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../mcu-node/firmware/qemu-an500/target/thumbv7em-none-eabihf/release/voicemesh-fw-qemu-an500")
    });
    assert!(
        path.is_file(),
        "firmware image {} missing: build it with `bash scripts/test-all.sh` (its firmware step) or \
         `cd mcu-node/firmware/qemu-an500 && cargo build --release --locked`, or set VOICEMESH_FW_QEMU",
        path.display()
    );
    path
}

fn require_qemu() {
    let ok = Command::new("qemu-system-arm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "qemu-system-arm is not installed (Debian package qemu-system-arm; scripts/test-all.sh installs it)"
    );
}

static TAP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace with a TAP device (`HOST_ADDR`/24, multicast routed to it) and the firmware
/// booted on QEMU behind it with `FW_ADDR`. QEMU dies with the namespace.
struct Board {
    ns: Netns,
    qemu: Child,
}

impl Board {
    fn boot(id: &str) -> Board {
        require_qemu();
        let image = firmware_image();
        let ns = Netns::new();
        let tap = format!("vmtap{}", TAP_COUNTER.fetch_add(1, Ordering::Relaxed));
        ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
        ns.ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        ns.ip(&["route", "del", "224.0.0.0/4", "dev", "lo"]);
        ns.ip(&["route", "add", "224.0.0.0/4", "dev", &tap]);
        let mut cmd = ns.command("qemu-system-arm");
        cmd.args([
            "-M",
            "mps2-an500",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "none",
        ])
        .args(["-semihosting-config", "enable=on,target=native"])
        .arg("-nic")
        .arg(format!(
            "tap,ifname={tap},script=no,downscript=no,model=lan9118"
        ))
        .arg("-kernel")
        .arg(&image)
        .arg("-append")
        .arg(format!("id={id} ip={FW_ADDR}/24 port={FW_PORT}"));
        let qemu = Child::spawn("qemu", cmd);
        qemu.expect_line("fw: ready on udp port", Duration::from_secs(20));
        Board { ns, qemu }
    }
}

#[test]
fn firmware_boots_advertises_over_mdns_and_answers_a_coordinator() {
    let board = Board::boot("qemu-fw-1");
    assert!(
        board
            .qemu
            .output()
            .contains(&format!("addr=Some(Cidr {{ address: {FW_ADDR}")),
        "{}",
        board.qemu.output()
    );

    // A real third-party mDNS browser resolves the firmware's service with its TXT keys.
    let script = format!(
        r#"
import sys
from zeroconf import Zeroconf
zc = Zeroconf(interfaces=["{HOST_ADDR}"])
info = zc.get_service_info("_voicemesh._udp.local.", "qemu-fw-1._voicemesh._udp.local.", timeout=5000)
zc.close()
if info is None:
    sys.exit("not resolved")
props = {{k.decode(): (v or b"").decode() for k, v in info.properties.items()}}
print("resolved", info.parsed_addresses()[0], info.port, sorted(props.items()))
"#
    );
    let t0 = Instant::now();
    let out = board
        .ns
        .command(python())
        .args(["-c", &script])
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "zeroconf: {stdout}{}\nfirmware:\n{}",
        String::from_utf8_lossy(&out.stderr),
        board.qemu.output()
    );
    assert!(
        stdout.contains(&format!(
            "resolved {FW_ADDR} {FW_PORT} [('cv', '8'), ('id', 'qemu-fw-1'), ('port', '{FW_PORT}'), ('proto', '1'), ('role', 'mcu'), ('voices', '2')]"
        )),
        "{stdout}"
    );
    eprintln!("mDNS resolved in {:?}", t0.elapsed());

    // The session speaks the MCU wire protocol: a coordinator's first heartbeat is answered
    // with the node's Hello (role mcu, its id, voices and CV channels).
    let hello = board.ns.in_ns(|| {
        let s = UdpSocket::bind((HOST_ADDR, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut buf = [0u8; MAX_DATAGRAM_LEN];
        let heartbeat = Message::Heartbeat(Heartbeat {
            seq: 0,
            now: ClusterTime(1_000_000_000),
        });
        let n = encode_datagram(
            DatagramHeader {
                session: 0x5eed_0001,
                seq: 1,
            },
            &heartbeat,
            &mut buf,
        )
        .expect("encode");
        s.send_to(&buf[..n], (FW_ADDR, FW_PORT)).expect("send");
        loop {
            let (n, from) = s.recv_from(&mut buf).expect("no answer from the firmware");
            assert_eq!(from.to_string(), format!("{FW_ADDR}:{FW_PORT}"));
            let (_, frame) =
                decode_datagram(&buf[..n]).expect("a datagram the protocol crate decodes");
            if let Message::Hello(h) = frame.message {
                return h;
            }
        }
    });
    assert_eq!(hello.role, Role::Mcu);
    assert_eq!(hello.id.as_str(), "qemu-fw-1");
    assert_eq!((hello.voices, hello.cv), (2, 8));
}
