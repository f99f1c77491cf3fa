#!/usr/bin/env python3
"""Writes a fuzz seed corpus from protocol/tests/golden/*.hex.

Usage: seed_corpus.py OUT_DIR [decode_frame|decode_datagram].
decode_frame (default): each input is one seed byte (the target's chunking seed) followed by
frame bytes: every golden vector alone, and all of them back to back.
decode_datagram: every golden vector behind a datagram header (docs/wire-protocol.md).
"""
import pathlib
import sys

golden = pathlib.Path(__file__).resolve().parent.parent / "protocol" / "tests" / "golden"
out = pathlib.Path(sys.argv[1])
target = sys.argv[2] if len(sys.argv) > 2 else "decode_frame"
out.mkdir(parents=True, exist_ok=True)
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
