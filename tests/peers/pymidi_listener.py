"""A pymidi 0.5.0 (MIT) RTP-MIDI listener for the VoiceMesh tests, run as a separate process.

Usage: python pymidi_listener.py PORT. Prints "listening", "connected" when a peer joins and
"midi <command> <params>" for every MIDI command received.
"""
import sys

from pymidi import server


class Printer(server.Handler):
    def on_peer_connected(self, peer):
        print("connected", peer, flush=True)

    def on_peer_disconnected(self, peer):
        print("disconnected", peer, flush=True)

    def on_midi_commands(self, peer, command_list):
        for c in command_list:
            print("midi", c.command, dict(c.params), flush=True)


port = int(sys.argv[1])
s = server.Server([("127.0.0.1", port)])
s.add_handler(Printer())
print("listening", port, flush=True)
s.serve_forever()
