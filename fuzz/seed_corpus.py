#!/usr/bin/env python3
"""Writes the fuzz seed corpus for decode_frame from protocol/tests/golden/*.hex.

Usage: seed_corpus.py OUT_DIR. Each input is one seed byte (the target's chunking seed)
followed by frame bytes: every golden vector alone, and all of them back to back.
"""
import pathlib
import sys

golden = pathlib.Path(__file__).resolve().parent.parent / "protocol" / "tests" / "golden"
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
frames = []
for path in sorted(golden.glob("*.hex")):
    digits = "".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    frame = bytes.fromhex("".join(digits.split()))
    frames.append(frame)
    (out / path.stem).write_bytes(bytes([len(frames)]) + frame)
if not frames:
    sys.exit(f"no golden vectors under {golden}")
(out / "all_frames").write_bytes(b"\x07" + b"".join(frames))
print(f"{len(frames) + 1} seed inputs in {out}")
