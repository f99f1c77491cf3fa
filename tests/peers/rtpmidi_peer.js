// A node-rtpmidi (npm `rtpmidi` 1.0.0, MIT) peer for the VoiceMesh tests, run as a separate
// process. Prints one line per milestone so the Rust test can wait for it.
//
//   node rtpmidi_peer.js initiator LOCAL_PORT REMOTE_PORT PACKETS_JSON
//     invites 127.0.0.1:REMOTE_PORT, waits for its own clock sync, then sends each packet
//     (a list of [delta_ticks, [bytes]] commands, 10 kHz ticks) 50 ms apart, prints "done"
//     and stays up until killed. A packet given as {"list": [bytes]} is a raw MIDI command
//     section (flags byte first), sent under node's own RTP header fields (its SSRC, next
//     sequence number, session clock) from its data socket: node-rtpmidi 1.0.0's encoder
//     cannot write a non-zero delta time (MidiMessage.generateBuffer writes the delta byte,
//     then the next command's first byte over it).
//   node rtpmidi_peer.js listener LOCAL_PORT
//     waits for an invitation; prints "connected", "synced" once its clock sync with the
//     initiator completed, and "midi <hex>" for each message received.
'use strict';
const rtpmidi = require('rtpmidi');

rtpmidi.logger.level = 'error';
const [mode, localPort, remotePort, packetsJson] = process.argv.slice(2);
const session = new rtpmidi.Session(Number(localPort), 'node-peer', 'node-peer');
const say = (s) => process.stdout.write(`${s}\n`);

function whenSynced(stream, then) {
  const t = setInterval(() => {
    if (stream.latency !== null && stream.timeDifference !== null) {
      clearInterval(t);
      then();
    }
  }, 10);
}

session.on('ready', () => {
  say('ready');
  if (mode === 'initiator') {
    session.connect({ address: '127.0.0.1', port: Number(remotePort) });
  }
});

session.on('streamAdded', (ev) => {
  const { stream } = ev;
  say('connected');
  whenSynced(stream, () => {
    say('synced');
    if (mode !== 'initiator') return;
    const packets = JSON.parse(packetsJson);
    let i = 0;
    const next = () => {
      if (i === packets.length) {
        say('done');
        return;
      }
      const p = packets[i];
      if (Array.isArray(p)) {
        const commands = p.map(([deltaTime, data]) => ({ deltaTime, data: Buffer.from(data) }));
        // Stream.sendMessage with node's own encoder: running status as it writes it.
        // (Session.sendMessage loses the delta times in 1.0.0.)
        stream.sendMessage({ timestamp: session.now(), commands });
      } else {
        stream.lastSentSequenceNr = (stream.lastSentSequenceNr + 1) % 0x10000;
        const header = Buffer.alloc(12);
        header.writeUInt8(0x80, 0);
        header.writeUInt8(0x61, 1);
        header.writeUInt16BE(stream.lastSentSequenceNr, 2);
        header.writeUInt32BE(session.now() >>> 0, 4);
        header.writeUInt32BE(session.ssrc >>> 0, 8);
        const buf = Buffer.concat([header, Buffer.from(p.list)]);
        session.messageChannel.send(buf, 0, buf.length, stream.rinfo2.port, stream.rinfo2.address);
      }
      say(`sent ${i}`);
      i += 1;
      setTimeout(next, 50);
    };
    next();
  });
});

session.on('message', (deltaTime, message) => {
  say(`midi ${Buffer.from(message).toString('hex')}`);
});

session.start();
