#!/usr/bin/env python3
"""Writes a fuzz seed corpus from protocol/tests/golden/*.hex.

Usage: seed_corpus.py OUT_DIR [decode_frame|decode_datagram|link_wire|rtpmidi|osc].
decode_frame (default): each input is one seed byte (the target's chunking seed) followed by
frame bytes: every golden vector alone, and all of them back to back.
decode_datagram: every golden vector behind a datagram header (docs/wire-protocol.md).
link_wire: the captured LinkHut ALIVE and a PING (shared/protocols/ableton-link.md §3, §5).
rtpmidi: an AppleMIDI IN, a CK and the notes' example RTP-MIDI packet (shared/protocols/rtp-midi.md).
osc: OSC messages for every kind of address (docs/osc.md), a timed bundle holding two of them,
and the bundle SLIP-framed and length-prefixed as on TCP.
"""
import pathlib
import struct
import sys

golden = pathlib.Path(__file__).resolve().parent.parent / "protocol" / "tests" / "golden"
out = pathlib.Path(sys.argv[1])
target = sys.argv[2] if len(sys.argv) > 2 else "decode_frame"
out.mkdir(parents=True, exist_ok=True)
if target == "link_wire":
    (out / "alive").write_bytes(bytes.fromhex(
        "5f617364705f76010105000060" "4e7a2758233a43746d6c6e00000018000000000007a120"
        "0000000000b349620000000000000000736573730000000860" "4e7a2758233a4373747374"
        "0000001100000000000000000000000000000000006d657034000000067f0000018dee"))
    (out / "ping").write_bytes(bytes.fromhex("5f6c696e6b5f7601015f5f687400000008000000002cf79893"))
    sys.exit(print(f"2 seed inputs for {target} in {out}"))
if target == "rtpmidi":
    (out / "in").write_bytes(bytes.fromhex("ffff494e0000000200000001000000077065657200"))
    (out / "ck").write_bytes(bytes.fromhex("ffff434b00000007000000") + bytes(25))
    (out / "rtp").write_bytes(bytes.fromhex("80e1efba0000181ce89b583a07903c640a803c00"))
    sys.exit(print(f"3 seed inputs for {target} in {out}"))
if target == "osc":
    def pad(b):
        return b + bytes(4 - len(b) % 4)

    def msg(addr, tags="", *args):
        out = pad(addr.encode()) + pad(("," + tags).encode())
        for t, a in zip(tags, args):
            out += {"i": lambda v: int(v).to_bytes(4, "big", signed=True),
                    "f": lambda v: struct.pack(">f", v), "d": lambda v: struct.pack(">d", v),
                    "s": lambda v: pad(v.encode())}[t](a)
        return out

    msgs = {
        "note": msg("/voicemesh/note", "iii", 60, 100, 2),
        "note_off": msg("/voicemesh/note", "fd", 60.0, 0.0),
        "panic": msg("/voicemesh/panic"),
        "cc": msg("/voicemesh/cc", "ii", 74, 64),
        "bend": msg("/voicemesh/bend", "ii", -8192, 1),
        "pressure": msg("/voicemesh/pressure", "i", 90),
        "param": msg("/voicemesh/param/cutoff", "f", 1200.0),
        "voice": msg("/voicemesh/voice/resonance", "ifi", 60, 0.5, 0),
        "cv": msg("/voicemesh/cv", "sif", "mcu-1", 0, 2.5),
        "tempo": msg("/voicemesh/tempo", "f", 128.0),
        "transport": msg("/voicemesh/transport", "i", 1),
        "subscribe": msg("/voicemesh/subscribe", "i", 9000),
        "unsubscribe": msg("/voicemesh/unsubscribe"),
    }
    for name, m in msgs.items():
        (out / name).write_bytes(m)
    inner = b"#bundle\0" + (1).to_bytes(8, "big") + b"".join(
        len(m).to_bytes(4, "big") + m for m in (msgs["cc"], msgs["note_off"]))
    bundle = b"#bundle\0" + (0xE6B0C6F0_80000000).to_bytes(8, "big") + b"".join(
        len(m).to_bytes(4, "big") + m for m in (msgs["note"], inner))
    (out / "bundle").write_bytes(bundle)
    slip = bundle.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    (out / "slip").write_bytes(b"\xc0" + slip + b"\xc0\xc0" + msgs["tempo"] + b"\xc0")
    (out / "length").write_bytes(b"".join(len(m).to_bytes(4, "big") + m for m in (bundle, msgs["cv"])))
    sys.exit(print(f"{len(list(out.iterdir()))} seed inputs for {target} in {out}"))
frames = []
for path in sorted(golden.glob("*.hex")):
    digits = "".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    frame = bytes.fromhex("".join(digits.split()))
    frames.append(frame)
    if target == "decode_datagram":
        # magic, version 1, mac 0, session, seq, 16 zero tag bytes
        header = b"VM\x01\x00" + (7).to_bytes(4, "big") + len(frames).to_bytes(4, "big")
        (out / path.stem).write_bytes(header + bytes(16) + frame)
    else:
        (out / path.stem).write_bytes(bytes([len(frames)]) + frame)
if not frames:
    sys.exit(f"no golden vectors under {golden}")
if target != "decode_datagram":
    (out / "all_frames").write_bytes(b"\x07" + b"".join(frames))
print(f"{len(list(out.iterdir()))} seed inputs for {target} in {out}")
