//! The DNS message format (RFC 1035 §4) as Multicast DNS uses it (RFC 6762 §18).
//!
//! [`Message::decode`] checks everything it reads: lengths against the buffer, label types,
//! name length (255 bytes), compression pointers (each must point strictly backwards, so a
//! pointer loop is impossible, and at most [`MAX_POINTER_JUMPS`] are followed per name), and
//! the number of records (at most [`MAX_RECORDS`] in all). Nothing is allocated from a count
//! read off the wire. Record types the service discovery does not need (AAAA, NSEC, …) are
//! skipped and kept only as their type number. [`Message::encode`] compresses names against
//! earlier names in the same message.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

/// Record type A (IPv4 address).
pub const TYPE_A: u16 = 1;
/// Record type PTR.
pub const TYPE_PTR: u16 = 12;
/// Record type TXT.
pub const TYPE_TXT: u16 = 16;
/// Record type AAAA (IPv6 address; skipped).
pub const TYPE_AAAA: u16 = 28;
/// Record type SRV (RFC 2782).
pub const TYPE_SRV: u16 = 33;
/// Question type ANY.
pub const TYPE_ANY: u16 = 255;
/// Class IN.
pub const CLASS_IN: u16 = 1;
/// The top bit of a record's class: cache-flush (RFC 6762 §10.2).
pub const CACHE_FLUSH: u16 = 0x8000;
/// The top bit of a question's class: unicast response requested, "QU" (RFC 6762 §5.4).
pub const UNICAST_RESPONSE: u16 = 0x8000;
/// Header flag: this message is a response.
pub const FLAG_RESPONSE: u16 = 0x8000;
/// Header flag: authoritative answer.
pub const FLAG_AUTHORITATIVE: u16 = 0x0400;
/// Header flag: truncated (more known answers follow).
pub const FLAG_TRUNCATED: u16 = 0x0200;
/// Records (questions included) decoded from one message at most.
pub const MAX_RECORDS: usize = 256;
/// Compression pointers followed in one name at most.
pub const MAX_POINTER_JUMPS: usize = 32;
/// Longest name on the wire, in bytes (RFC 1035 §3.1).
pub const MAX_NAME_LEN: usize = 255;
/// Longest label, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The message ends inside a header, name or record.
    Truncated,
    /// A label type other than 0b00 (literal) or 0b11 (pointer).
    BadLabelType,
    /// A name longer than 255 bytes.
    NameTooLong,
    /// A compression pointer that does not point strictly backwards, or too many of them.
    BadPointer,
    /// More than [`MAX_RECORDS`] questions and records.
    TooManyRecords,
    /// A record whose data does not fit its own length or its type's layout.
    BadRecordData,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireError::Truncated => "message truncated",
            WireError::BadLabelType => "reserved label type",
            WireError::NameTooLong => "name longer than 255 bytes",
            WireError::BadPointer => "compression pointer loops or points forward",
            WireError::TooManyRecords => "too many records",
            WireError::BadRecordData => "record data does not match its length or type",
        })
    }
}

impl std::error::Error for WireError {}

/// A domain name as its labels (without the empty root label). Comparison ignores ASCII case,
/// as DNS does.
#[derive(Clone, Debug, Default, Eq)]
pub struct Name {
    labels: Vec<Vec<u8>>,
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.labels.len() == other.labels.len()
            && self
                .labels
                .iter()
                .zip(&other.labels)
                .all(|(a, b)| a.eq_ignore_ascii_case(b))
    }
}

impl Name {
    /// A name from its labels. `None` if a label is empty or longer than 63 bytes, or the
    /// whole name is longer than 255 bytes.
    pub fn from_labels<L: AsRef<[u8]>>(labels: impl IntoIterator<Item = L>) -> Option<Name> {
        let labels: Vec<Vec<u8>> = labels.into_iter().map(|l| l.as_ref().to_vec()).collect();
        let ok = labels
            .iter()
            .all(|l| !l.is_empty() && l.len() <= MAX_LABEL_LEN)
            && labels.iter().map(|l| l.len() + 1).sum::<usize>() < MAX_NAME_LEN;
        ok.then_some(Name { labels })
    }

    /// A name from dotted text such as `_voicemesh._udp.local.` (no escapes: labels cannot
    /// contain dots this way; use [`Name::child`] for an instance label).
    pub fn parse(dotted: &str) -> Option<Name> {
        let s = dotted.strip_suffix('.').unwrap_or(dotted);
        if s.is_empty() {
            return Some(Name::default());
        }
        Name::from_labels(s.split('.'))
    }

    /// `label` prepended to this name (a service instance under its service type). The label
    /// may contain any bytes, dots included (RFC 6763 §4.3).
    pub fn child(&self, label: &[u8]) -> Option<Name> {
        Name::from_labels(std::iter::once(label).chain(self.labels.iter().map(Vec::as_slice)))
    }

    /// The labels.
    pub fn labels(&self) -> &[Vec<u8>] {
        &self.labels
    }

    /// The first label, as text (lossy), e.g. the instance of a service instance name.
    pub fn first_label(&self) -> String {
        self.labels
            .first()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .unwrap_or_default()
    }

    /// The name without its first label.
    pub fn parent(&self) -> Name {
        Name {
            labels: self.labels.iter().skip(1).cloned().collect(),
        }
    }

    /// Bytes on the wire when written without compression.
    fn wire_len(&self) -> usize {
        self.labels.iter().map(|l| l.len() + 1).sum::<usize>() + 1
    }
}

impl fmt::Display for Name {
    /// Dotted text with a trailing dot; dots and backslashes inside labels are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.labels {
            for c in String::from_utf8_lossy(l).chars() {
                if c == '.' || c == '\\' {
                    write!(f, "\\{c}")?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            f.write_str(".")?;
        }
        if self.labels.is_empty() {
            f.write_str(".")?;
        }
        Ok(())
    }
}

/// One question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// The name asked about.
    pub name: Name,
    /// The record type asked for.
    pub qtype: u16,
    /// The class without the QU bit (1 = IN).
    pub qclass: u16,
    /// The QU bit: the querier would accept a unicast response.
    pub unicast_response: bool,
}

/// The data of a resource record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// A pointer to another name.
    Ptr(Name),
    /// A service location.
    Srv {
        /// Priority (lower first).
        priority: u16,
        /// Weight among equal priorities.
        weight: u16,
        /// Port.
        port: u16,
        /// Host name.
        target: Name,
    },
    /// Character strings; in DNS-SD each is `key=value` (RFC 6763 §6).
    Txt(Vec<Vec<u8>>),
    /// A type this module does not interpret (AAAA, NSEC, …); its data was skipped.
    Other(u16),
}

impl RData {
    /// The record type.
    pub fn rtype(&self) -> u16 {
        match self {
            RData::A(_) => TYPE_A,
            RData::Ptr(_) => TYPE_PTR,
            RData::Srv { .. } => TYPE_SRV,
            RData::Txt(_) => TYPE_TXT,
            RData::Other(t) => *t,
        }
    }
}

/// One resource record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The owner name.
    pub name: Name,
    /// The class without the cache-flush bit (1 = IN).
    pub class: u16,
    /// The cache-flush bit: this record replaces every other of its name and type.
    pub cache_flush: bool,
    /// Time to live in seconds; 0 is a goodbye.
    pub ttl: u32,
    /// The data.
    pub data: RData,
}

/// A whole DNS message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// Transaction id (0 in multicast mDNS; echoed in legacy unicast replies).
    pub id: u16,
    /// The flags word (QR, opcode, AA, TC, RD, RA, Z, RCODE).
    pub flags: u16,
    /// Questions.
    pub questions: Vec<Question>,
    /// Answers (in a query: known answers).
    pub answers: Vec<Record>,
    /// Authority records (in a query: probe proposals).
    pub authorities: Vec<Record>,
    /// Additional records.
    pub additionals: Vec<Record>,
}

/// Splits TXT strings into `key=value` pairs (RFC 6763 §6.3–6.4): a string without `=` is a
/// key with an empty value, an empty key is dropped, and only the first occurrence of a key
/// (compared without case) counts.
pub fn txt_pairs(strings: &[Vec<u8>]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for s in strings {
        let (k, v) = match s.iter().position(|&b| b == b'=') {
            Some(i) => (&s[..i], &s[i + 1..]),
            None => (&s[..], &[][..]),
        };
        if k.is_empty() {
            continue;
        }
        let k = String::from_utf8_lossy(k).into_owned();
        if out.iter().any(|(o, _)| o.eq_ignore_ascii_case(&k)) {
            continue;
        }
        out.push((k, String::from_utf8_lossy(v).into_owned()));
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A name at the current position, following compression pointers; the position ends
    /// after the name's bytes at its original place.
    fn name(&mut self) -> Result<Name, WireError> {
        let mut labels = Vec::new();
        let mut len = 1usize;
        let mut pos = self.pos;
        // Every pointer must point below the start of the label sequence that holds it, so
        // the walk strictly descends and ends; the jump cap bounds the work.
        let mut floor = self.pos;
        let mut jumps = 0;
        let mut end_after_first_pointer = None;
        loop {
            let b = *self.buf.get(pos).ok_or(WireError::Truncated)?;
            match b & 0xC0 {
                0x00 => {
                    let n = usize::from(b);
                    if n == 0 {
                        pos += 1;
                        break;
                    }
                    let label = self
                        .buf
                        .get(pos + 1..pos + 1 + n)
                        .ok_or(WireError::Truncated)?;
                    len += n + 1;
                    if len > MAX_NAME_LEN {
                        return Err(WireError::NameTooLong);
                    }
                    labels.push(label.to_vec());
                    pos += 1 + n;
                }
                0xC0 => {
                    let lo = *self.buf.get(pos + 1).ok_or(WireError::Truncated)?;
                    let target = usize::from(u16::from_be_bytes([b & 0x3F, lo]));
                    jumps += 1;
                    if target >= floor || jumps > MAX_POINTER_JUMPS {
                        return Err(WireError::BadPointer);
                    }
                    end_after_first_pointer.get_or_insert(pos + 2);
                    floor = target;
                    pos = target;
                }
                _ => return Err(WireError::BadLabelType),
            }
        }
        self.pos = end_after_first_pointer.unwrap_or(pos);
        Ok(Name { labels })
    }

    fn question(&mut self) -> Result<Question, WireError> {
        let name = self.name()?;
        let qtype = self.u16()?;
        let class = self.u16()?;
        Ok(Question {
            name,
            qtype,
            qclass: class & !UNICAST_RESPONSE,
            unicast_response: class & UNICAST_RESPONSE != 0,
        })
    }

    fn record(&mut self) -> Result<Record, WireError> {
        let name = self.name()?;
        let rtype = self.u16()?;
        let class = self.u16()?;
        let ttl = self.u32()?;
        let rdlen = usize::from(self.u16()?);
        let start = self.pos;
        let end = start.checked_add(rdlen).ok_or(WireError::Truncated)?;
        if end > self.buf.len() {
            return Err(WireError::Truncated);
        }
        let data = match rtype {
            TYPE_A => {
                let b = self.take(4).map_err(|_| WireError::BadRecordData)?;
                RData::A(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            TYPE_PTR => RData::Ptr(self.name()?),
            TYPE_SRV => RData::Srv {
                priority: self.u16()?,
                weight: self.u16()?,
                port: self.u16()?,
                target: self.name()?,
            },
            TYPE_TXT => {
                let mut strings = Vec::new();
                while self.pos < end {
                    let n = usize::from(self.u8()?);
                    strings.push(self.take(n)?.to_vec());
                }
                // A TXT record with no strings is written as one empty string (RFC 6763
                // §6.1); both forms mean "no keys".
                strings.retain(|s| !s.is_empty());
                RData::Txt(strings)
            }
            other => {
                self.pos = end;
                RData::Other(other)
            }
        };
        if self.pos != end {
            return Err(WireError::BadRecordData);
        }
        Ok(Record {
            name,
            class: class & !CACHE_FLUSH,
            cache_flush: class & CACHE_FLUSH != 0,
            ttl,
            data,
        })
    }
}

impl Message {
    /// True for a response (QR bit set).
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    /// The opcode (0 = standard query; mDNS ignores the others).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0x0F) as u8
    }

    /// Every record: answers, then authorities, then additionals.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.answers
            .iter()
            .chain(&self.authorities)
            .chain(&self.additionals)
    }

    /// Decodes a message. Never panics; see the module documentation for the limits.
    pub fn decode(buf: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader { buf, pos: 0 };
        let id = r.u16()?;
        let flags = r.u16()?;
        let counts = [r.u16()?, r.u16()?, r.u16()?, r.u16()?];
        if counts.iter().map(|&c| usize::from(c)).sum::<usize>() > MAX_RECORDS {
            return Err(WireError::TooManyRecords);
        }
        let mut m = Message {
            id,
            flags,
            ..Message::default()
        };
        for _ in 0..counts[0] {
            m.questions.push(r.question()?);
        }
        for (i, section) in [&mut m.answers, &mut m.authorities, &mut m.additionals]
            .into_iter()
            .enumerate()
        {
            for _ in 0..counts[i + 1] {
                section.push(r.record()?);
            }
        }
        Ok(m)
    }

    /// Encodes the message, compressing repeated name suffixes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer {
            buf: Vec::with_capacity(512),
            names: HashMap::new(),
        };
        w.u16(self.id);
        w.u16(self.flags);
        for n in [
            self.questions.len(),
            self.answers.len(),
            self.authorities.len(),
            self.additionals.len(),
        ] {
            w.u16(u16::try_from(n).unwrap_or(u16::MAX));
        }
        for q in self.questions.iter().take(usize::from(u16::MAX)) {
            w.name(&q.name);
            w.u16(q.qtype);
            w.u16(
                q.qclass
                    | if q.unicast_response {
                        UNICAST_RESPONSE
                    } else {
                        0
                    },
            );
        }
        for r in self
            .answers
            .iter()
            .take(usize::from(u16::MAX))
            .chain(self.authorities.iter().take(usize::from(u16::MAX)))
            .chain(self.additionals.iter().take(usize::from(u16::MAX)))
        {
            w.record(r);
        }
        w.buf
    }
}

struct Writer {
    buf: Vec<u8>,
    /// Lower-cased label suffixes already written, and their offsets.
    names: HashMap<Vec<Vec<u8>>, u16>,
}

impl Writer {
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn name(&mut self, name: &Name) {
        for i in 0..name.labels.len() {
            let key: Vec<Vec<u8>> = name.labels[i..]
                .iter()
                .map(|l| l.to_ascii_lowercase())
                .collect();
            if let Some(&off) = self.names.get(&key) {
                self.u16(0xC000 | off);
                return;
            }
            // Only offsets below 0x4000 fit a pointer.
            if let Ok(off) = u16::try_from(self.buf.len())
                && off < 0x4000
            {
                self.names.insert(key, off);
            }
            let l = &name.labels[i];
            self.buf.push(l.len() as u8);
            self.buf.extend_from_slice(l);
        }
        self.buf.push(0);
    }

    fn record(&mut self, r: &Record) {
        self.name(&r.name);
        self.u16(r.data.rtype());
        self.u16(r.class | if r.cache_flush { CACHE_FLUSH } else { 0 });
        self.buf.extend_from_slice(&r.ttl.to_be_bytes());
        let len_at = self.buf.len();
        self.u16(0);
        match &r.data {
            RData::A(a) => self.buf.extend_from_slice(&a.octets()),
            RData::Ptr(n) => self.name(n),
            RData::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                self.u16(*priority);
                self.u16(*weight);
                self.u16(*port);
                self.name(target);
            }
            RData::Txt(strings) => {
                let mut any = false;
                for s in strings.iter().filter(|s| !s.is_empty()) {
                    let s = &s[..s.len().min(255)];
                    self.buf.push(s.len() as u8);
                    self.buf.extend_from_slice(s);
                    any = true;
                }
                if !any {
                    self.buf.push(0);
                }
            }
            RData::Other(_) => {}
        }
        let len = u16::try_from(self.buf.len() - len_at - 2).unwrap_or(u16::MAX);
        self.buf[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
    }
}

/// An upper bound of a record's encoded size without compression, used to split long
/// responses.
pub fn record_len_bound(r: &Record) -> usize {
    let data = match &r.data {
        RData::A(_) => 4,
        RData::Ptr(n) => n.wire_len(),
        RData::Srv { target, .. } => 6 + target.wire_len(),
        RData::Txt(s) => s.iter().map(|s| s.len().min(255) + 1).sum::<usize>().max(1),
        RData::Other(_) => 0,
    };
    r.name.wire_len() + 10 + data
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Appends raw labels ending with a zero byte.
    fn labels(out: &mut Vec<u8>, ls: &[&str]) {
        for l in ls {
            out.push(l.len() as u8);
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
    }

    #[test]
    fn decodes_a_hand_built_ptr_query() {
        // RFC 1035 §4.1: id, flags, QDCOUNT=1, AN/NS/AR=0; then QNAME QTYPE=PTR QCLASS=IN|QU.
        let mut b = vec![0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        labels(&mut b, &["_voicemesh", "_udp", "local"]);
        b.extend_from_slice(&[0x00, 0x0C, 0x80, 0x01]);
        let m = Message::decode(&b).unwrap();
        assert_eq!(m.id, 0x1234);
        assert!(!m.is_response());
        assert_eq!(m.questions.len(), 1);
        let q = &m.questions[0];
        assert_eq!(q.name, Name::parse("_VoiceMesh._udp.local.").unwrap());
        assert_eq!(q.name.to_string(), "_voicemesh._udp.local.");
        assert_eq!(
            (q.qtype, q.qclass, q.unicast_response),
            (TYPE_PTR, CLASS_IN, true)
        );
        // Our encoder writes the same bytes (no earlier name to point at).
        assert_eq!(m.encode(), b);
    }

    /// A response as an mDNS responder writes it: PTR + SRV + TXT + A + AAAA, names
    /// compressed against the first one.
    fn hand_built_response() -> Vec<u8> {
        let mut b = vec![0, 0, 0x84, 0x00, 0, 0, 0, 1, 0, 0, 0, 4];
        // Answer: _voicemesh._udp.local. PTR n1.<ptr to 12>
        assert_eq!(b.len(), 12);
        labels(&mut b, &["_voicemesh", "_udp", "local"]);
        b.extend_from_slice(&[0x00, 0x0C, 0x00, 0x01, 0, 0, 0x11, 0x94, 0, 5]);
        let instance_at = b.len();
        b.extend_from_slice(&[2, b'n', b'1', 0xC0, 12]);
        // Additional: <ptr instance> SRV 0 0 8080 host.<ptr to "local" at 28>, cache-flush.
        let local_at = 12 + 1 + 10 + 1 + 4;
        b.extend_from_slice(&[
            0xC0,
            instance_at as u8,
            0x00,
            0x21,
            0x80,
            0x01,
            0,
            0,
            0,
            120,
        ]);
        b.extend_from_slice(&[0, 13, 0, 0, 0, 0, 0x1F, 0x90]);
        let host_at = b.len();
        b.extend_from_slice(&[4, b'h', b'o', b's', b't', 0xC0, local_at as u8]);
        // <ptr instance> TXT "id=n1" "flag", cache-flush.
        b.extend_from_slice(&[
            0xC0,
            instance_at as u8,
            0x00,
            0x10,
            0x80,
            0x01,
            0,
            0,
            0x11,
            0x94,
        ]);
        b.extend_from_slice(&[
            0, 11, 5, b'i', b'd', b'=', b'n', b'1', 4, b'f', b'l', b'a', b'g',
        ]);
        // <ptr host> A 127.0.0.1
        b.extend_from_slice(&[0xC0, host_at as u8, 0x00, 0x01, 0x80, 0x01, 0, 0, 0, 120]);
        b.extend_from_slice(&[0, 4, 127, 0, 0, 1]);
        // <ptr host> AAAA ::1 (skipped, kept as its type)
        b.extend_from_slice(&[
            0xC0,
            host_at as u8,
            0x00,
            0x1C,
            0x80,
            0x01,
            0,
            0,
            0,
            120,
            0,
            16,
        ]);
        b.extend_from_slice(&[0; 15]);
        b.push(1);
        b
    }

    #[test]
    fn decodes_a_hand_built_compressed_response() {
        let m = Message::decode(&hand_built_response()).unwrap();
        assert!(m.is_response());
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.additionals.len(), 4);
        let service = Name::parse("_voicemesh._udp.local.").unwrap();
        let instance = service.child(b"n1").unwrap();
        let host = Name::parse("host.local.").unwrap();
        assert_eq!(m.answers[0].data, RData::Ptr(instance.clone()));
        assert_eq!((m.answers[0].ttl, m.answers[0].cache_flush), (4500, false));
        let srv = &m.additionals[0];
        assert_eq!(srv.name, instance);
        assert!(srv.cache_flush);
        assert_eq!(
            srv.data,
            RData::Srv {
                priority: 0,
                weight: 0,
                port: 8080,
                target: host.clone()
            }
        );
        let RData::Txt(t) = &m.additionals[1].data else {
            panic!("TXT expected")
        };
        assert_eq!(
            txt_pairs(t),
            vec![("id".into(), "n1".into()), ("flag".into(), String::new())]
        );
        assert_eq!(m.additionals[2].name, host);
        assert_eq!(m.additionals[2].data, RData::A(Ipv4Addr::LOCALHOST));
        assert_eq!(m.additionals[3].data, RData::Other(TYPE_AAAA));
        // Round trip through our encoder (AAAA data is not kept, so drop it).
        let mut m2 = m.clone();
        m2.additionals.pop();
        let bytes = m2.encode();
        assert_eq!(Message::decode(&bytes).unwrap(), m2);
        assert!(bytes.len() < hand_built_response().len());
    }

    #[test]
    fn compression_loops_and_forward_pointers_are_errors() {
        // A name that is a pointer to itself.
        let mut b = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 12, 0, 1];
        assert_eq!(Message::decode(&b), Err(WireError::BadPointer));
        // Two names pointing at each other: 12 → label "a" then pointer to 17 (forward).
        b = vec![0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&[1, b'a', 0xC0, 18, 0, 12, 0, 1]);
        b.extend_from_slice(&[1, b'b', 0xC0, 12, 0, 12, 0, 1]);
        assert_eq!(Message::decode(&b), Err(WireError::BadPointer));
        // Reserved label type 0b01.
        b = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x41, 0, 0, 12, 0, 1];
        assert_eq!(Message::decode(&b), Err(WireError::BadLabelType));
    }

    #[test]
    fn hostile_counts_and_lengths_are_errors() {
        // 65535 questions claimed, none present: refused before any work.
        let b = [0, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0];
        assert_eq!(Message::decode(&b), Err(WireError::TooManyRecords));
        let b = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(Message::decode(&b), Err(WireError::Truncated));
        // A 300-byte name made of 5 × 60-byte labels.
        let mut b = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            b.push(60);
            b.extend_from_slice(&[b'x'; 60]);
        }
        b.extend_from_slice(&[0, 0, 12, 0, 1]);
        assert_eq!(Message::decode(&b), Err(WireError::NameTooLong));
        // An A record whose RDLENGTH says 5.
        let mut b = vec![0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        b.extend_from_slice(&[0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(Message::decode(&b), Err(WireError::BadRecordData));
        // Every truncation of a valid message is an error, not a panic.
        let full = hand_built_response();
        for n in 0..full.len() {
            assert!(Message::decode(&full[..n]).is_err(), "prefix {n}");
        }
        assert!(!WireError::BadPointer.to_string().is_empty());
    }

    #[test]
    fn names_with_dots_in_labels_survive() {
        let service = Name::parse("_voicemesh._udp.local.").unwrap();
        let n = service.child(b"studio.left").unwrap();
        assert_eq!(n.first_label(), "studio.left");
        assert_eq!(n.to_string(), "studio\\.left._voicemesh._udp.local.");
        assert_eq!(n.parent(), service);
        assert!(service.child(&[b'x'; 64]).is_none());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = Message::decode(&bytes) {
                // What decodes re-encodes to something that decodes to the same message.
                prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
            }
        }

        #[test]
        fn mutated_responses_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
            let mut b = hand_built_response();
            let i = pos % b.len();
            b[i] = val;
            b.truncate(b.len() - cut % b.len());
            let _ = Message::decode(&b);
        }
    }
}
