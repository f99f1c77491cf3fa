//! A sans-IO mDNS responder for DNS-SD service instances (RFC 6762, RFC 6763).
//!
//! Each [`ServiceInstance`] gives four records: `PTR <service> → <instance>.<service>` (shared,
//! TTL 75 min), `SRV <instance>.<service> → <host>.local.:port` and `TXT` (unique, 2 min and
//! 75 min), and `A <host>.local. → address` (unique, 2 min). The responder also answers the
//! service-type enumeration `_services._dns-sd._udp.local. PTR <service>` (RFC 6763 §9).
//! Answers to a PTR question carry the SRV, TXT and A records as additional records
//! (RFC 6763 §12), so one exchange resolves an instance.
//!
//! Call order: [`Responder::start`] once, then in any order [`Responder::handle_query`] for
//! every datagram received on the mDNS socket (it returns the reply, if any), and
//! [`Responder::handle_timeout`] whenever [`Responder::poll_timeout`] has passed; after either,
//! drain [`Responder::poll_transmit`]. [`Responder::stop`] queues the goodbye (every record with
//! TTL 0); send it, then drop the responder. Time is milliseconds on any monotonic clock the
//! glue chooses.
//!
//! Not done: probing and conflict resolution (RFC 6762 §8–9). VoiceMesh instance and host
//! names come from node ids, unique by configuration, and two responders claiming one name
//! would be a configuration error that probing could only rename around. Responses are always
//! multicast, also to QU questions (allowed by RFC 6762 §5.4), except legacy unicast replies
//! to queries from a source port other than 5353 (§6.7). The random 20–120 ms delay for shared
//! records (§6) is not applied: answers leave at once. Known-answer suppression (§7.1) is done.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use super::wire::{
    CLASS_IN, FLAG_AUTHORITATIVE, FLAG_RESPONSE, Message, Name, Question, RData, Record, TYPE_ANY,
    TYPE_PTR,
};
use super::{MDNS_PORT, ServiceInstance};

/// TTL of host-name related records (SRV, A), seconds (RFC 6762 §10).
pub const HOST_TTL: u32 = 120;
/// TTL of the other records (PTR, TXT), seconds.
pub const OTHER_TTL: u32 = 75 * 60;
/// Highest TTL of a legacy unicast reply, seconds (RFC 6762 §6.7).
const LEGACY_TTL: u32 = 10;
/// Minimum gap between two multicasts of one record, ms (RFC 6762 §6).
const MULTICAST_GAP_MS: u64 = 1000;
/// Gap between the two announcements, ms (RFC 6762 §8.3).
const ANNOUNCE_GAP_MS: u64 = 1000;
/// A response larger than this is split (well under the 1500-byte Ethernet MTU).
const MAX_PACKET: usize = 1400;

/// The service-type enumeration name (RFC 6763 §9).
pub const SERVICES_ENUMERATION: &str = "_services._dns-sd._udp.local.";

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 224.0.0.251:5353 on the scope's interface.
    Multicast,
    /// Straight back to a legacy unicast querier.
    Unicast(SocketAddr),
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where.
    pub destination: Destination,
    /// The encoded DNS message.
    pub payload: Vec<u8>,
}

/// A service instance name, type or host name that cannot be written as a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadName(pub String);

impl std::fmt::Display for BadName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} is not a valid DNS name (labels of 1–63 bytes, 255 in all)",
            self.0
        )
    }
}

impl std::error::Error for BadName {}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponderStats {
    /// Queries answered (multicast or unicast).
    pub answered: u64,
    /// Datagrams dropped because they could not be decoded.
    pub malformed: u64,
    /// Answers left out because the querier listed them as known answers.
    pub suppressed: u64,
}

struct Rec {
    record: Record,
    /// When this record was last multicast, ms.
    last_multicast: Option<u64>,
}

/// The responder. See the module documentation for the call order.
#[derive(Debug)]
pub struct Responder {
    records: Vec<Rec>,
    next_announce: Option<u64>,
    announcements_left: u8,
    transmits: VecDeque<Transmit>,
    stats: ResponderStats,
}

impl std::fmt::Debug for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.record.name, self.record.data)
    }
}

/// The records of `instances` at `addr`, PTRs first, without duplicates.
pub fn instance_records(
    instances: &[ServiceInstance],
    addr: Ipv4Addr,
) -> Result<Vec<Record>, BadName> {
    let mut out: Vec<Record> = Vec::new();
    let enumeration = Name::parse(SERVICES_ENUMERATION).ok_or_else(|| BadName("".into()))?;
    let rec = |name: Name, ttl, cache_flush, data| Record {
        name,
        class: CLASS_IN,
        cache_flush,
        ttl,
        data,
    };
    for i in instances {
        let service =
            Name::parse(&i.service_type).ok_or_else(|| BadName(i.service_type.clone()))?;
        let full = service
            .child(i.instance.as_bytes())
            .ok_or_else(|| BadName(i.instance.clone()))?;
        let host_label = i.host.strip_suffix(".local.").unwrap_or(&i.host);
        let host = Name::parse("local.")
            .and_then(|l| l.child(host_label.as_bytes()))
            .ok_or_else(|| BadName(i.host.clone()))?;
        let txt = i
            .txt
            .iter()
            .map(|(k, v)| format!("{k}={v}").into_bytes())
            .collect();
        let new = [
            rec(
                enumeration.clone(),
                OTHER_TTL,
                false,
                RData::Ptr(service.clone()),
            ),
            rec(service, OTHER_TTL, false, RData::Ptr(full.clone())),
            rec(
                full.clone(),
                HOST_TTL,
                true,
                RData::Srv {
                    priority: 0,
                    weight: 0,
                    port: i.port,
                    target: host.clone(),
                },
            ),
            rec(full, OTHER_TTL, true, RData::Txt(txt)),
            rec(host, HOST_TTL, true, RData::A(addr)),
        ];
        for r in new {
            if !out.iter().any(|o| o.name == r.name && o.data == r.data) {
                out.push(r);
            }
        }
    }
    out.sort_by_key(|r| r.data.rtype() != TYPE_PTR);
    Ok(out)
}

fn question_matches(q: &Question, r: &Record) -> bool {
    (q.qclass == CLASS_IN || q.qclass == TYPE_ANY)
        && (q.qtype == TYPE_ANY || q.qtype == r.data.rtype())
        && q.name == r.name
}

impl Responder {
    /// A responder for `instances`, all reachable at `addr`.
    pub fn new(instances: &[ServiceInstance], addr: Ipv4Addr) -> Result<Responder, BadName> {
        let records = instance_records(instances, addr)?
            .into_iter()
            .map(|record| Rec {
                record,
                last_multicast: None,
            })
            .collect();
        Ok(Responder {
            records,
            next_announce: None,
            announcements_left: 0,
            transmits: VecDeque::new(),
            stats: ResponderStats::default(),
        })
    }

    /// Schedules the two announcements, the first at `now`.
    pub fn start(&mut self, now: u64) {
        self.announcements_left = 2;
        self.next_announce = Some(now);
    }

    /// Counters.
    pub fn stats(&self) -> ResponderStats {
        self.stats
    }

    /// When [`Responder::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.next_announce
    }

    /// Sends the announcements that are due.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.next_announce.is_some_and(|t| t <= now) {
            let all: Vec<usize> = (0..self.records.len()).collect();
            self.queue_multicast(now, &all, &[], None);
            self.announcements_left = self.announcements_left.saturating_sub(1);
            self.next_announce = (self.announcements_left > 0).then_some(now + ANNOUNCE_GAP_MS);
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Queues the goodbye: every record with TTL 0 (RFC 6762 §10.1). The responder then stays
    /// silent.
    pub fn stop(&mut self) {
        self.next_announce = None;
        let records: Vec<Record> = self
            .records
            .iter()
            .map(|r| Record {
                ttl: 0,
                ..r.record.clone()
            })
            .collect();
        self.push_response(Destination::Multicast, 0, &[], records, Vec::new());
        for r in &mut self.records {
            r.last_multicast = None;
        }
        self.records.clear();
    }

    /// Handles one received datagram from `from`. Returns the reply, if the datagram is a
    /// query this responder has answers for; a datagram that is not a well-formed query is
    /// dropped (and counted). A reply too long for one datagram leaves its tail in
    /// [`Responder::poll_transmit`].
    pub fn handle_query(&mut self, now: u64, bytes: &[u8], from: SocketAddr) -> Option<Transmit> {
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return None;
            }
        };
        if msg.is_response() || msg.opcode() != 0 || msg.questions.is_empty() {
            return None;
        }
        let legacy = from.port() != MDNS_PORT;
        let mut answers: Vec<usize> = Vec::new();
        for q in &msg.questions {
            for (i, r) in self.records.iter().enumerate() {
                if question_matches(q, &r.record) && !answers.contains(&i) {
                    answers.push(i);
                }
            }
        }
        // Known-answer suppression (RFC 6762 §7.1): the querier already holds the record with
        // at least half its TTL left.
        let before = answers.len();
        answers.retain(|&i| {
            let ours = &self.records[i].record;
            !msg.answers
                .iter()
                .any(|k| k.name == ours.name && k.data == ours.data && k.ttl >= ours.ttl / 2)
        });
        self.stats.suppressed += (before - answers.len()) as u64;
        if answers.is_empty() {
            return None;
        }
        let additional = self.additionals_for(&answers);
        self.stats.answered += 1;
        let before = self.transmits.len();
        if legacy {
            let to_record = |i: &usize| {
                let mut r = self.records[*i].record.clone();
                r.ttl = r.ttl.min(LEGACY_TTL);
                r.cache_flush = false;
                r
            };
            let ans = answers.iter().map(to_record).collect();
            let add = additional.iter().map(to_record).collect();
            self.push_response(Destination::Unicast(from), msg.id, &msg.questions, ans, add);
        } else {
            self.queue_multicast(now, &answers, &additional, Some(()));
        }
        if self.transmits.len() > before {
            // The reply is the first datagram this call produced; the rest stay queued.
            self.transmits.remove(before)
        } else {
            None
        }
    }

    /// SRV/TXT/A for PTR answers, A for SRV answers (RFC 6763 §12), minus the answers.
    fn additionals_for(&self, answers: &[usize]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        let add = |name: &Name, only_a: bool, out: &mut Vec<usize>| {
            for (j, r) in self.records.iter().enumerate() {
                let r = &r.record;
                let wanted = r.name == *name
                    && (!only_a || r.data.rtype() == super::wire::TYPE_A)
                    && r.data.rtype() != TYPE_PTR;
                if wanted && !answers.contains(&j) && !out.contains(&j) {
                    out.push(j);
                }
            }
        };
        for &i in answers {
            match &self.records[i].record.data {
                RData::Ptr(target) => {
                    add(target, false, &mut out);
                    let hosts: Vec<Name> = self
                        .records
                        .iter()
                        .filter_map(|r| match &r.record.data {
                            RData::Srv { target: h, .. } if r.record.name == *target => {
                                Some(h.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    for h in &hosts {
                        add(h, true, &mut out);
                    }
                }
                RData::Srv { target, .. } => add(target, true, &mut out),
                _ => {}
            }
        }
        out
    }

    /// Multicasts `answers` (minus those multicast in the last second, unless `rate_limit` is
    /// `None`) with `additional`.
    fn queue_multicast(
        &mut self,
        now: u64,
        answers: &[usize],
        additional: &[usize],
        rate_limit: Option<()>,
    ) {
        let recent = |r: &Rec| {
            rate_limit.is_some() && r.last_multicast.is_some_and(|t| now < t + MULTICAST_GAP_MS)
        };
        let answers: Vec<usize> = answers
            .iter()
            .copied()
            .filter(|&i| !recent(&self.records[i]))
            .collect();
        if answers.is_empty() {
            return;
        }
        for &i in answers.iter().chain(additional) {
            self.records[i].last_multicast = Some(now);
        }
        let ans = answers
            .iter()
            .map(|&i| self.records[i].record.clone())
            .collect();
        let add = additional
            .iter()
            .map(|&i| self.records[i].record.clone())
            .collect();
        self.push_response(Destination::Multicast, 0, &[], ans, add);
    }

    /// Encodes a response, split into datagrams of at most about [`MAX_PACKET`] bytes.
    fn push_response(
        &mut self,
        destination: Destination,
        id: u16,
        questions: &[Question],
        answers: Vec<Record>,
        additionals: Vec<Record>,
    ) {
        let base = 12
            + questions
                .iter()
                .map(|q| q.name.labels().iter().map(|l| l.len() + 1).sum::<usize>() + 5)
                .sum::<usize>();
        let mut msg = Message {
            id,
            flags: FLAG_RESPONSE | FLAG_AUTHORITATIVE,
            questions: questions.to_vec(),
            ..Message::default()
        };
        let mut size = base;
        let flush = |msg: &mut Message, size: &mut usize, out: &mut VecDeque<Transmit>| {
            if !msg.answers.is_empty() || !msg.additionals.is_empty() {
                out.push_back(Transmit {
                    destination,
                    payload: msg.encode(),
                });
            }
            msg.answers.clear();
            msg.additionals.clear();
            *size = base;
        };
        for (r, is_answer) in answers
            .into_iter()
            .map(|r| (r, true))
            .chain(additionals.into_iter().map(|r| (r, false)))
        {
            let n = super::wire::record_len_bound(&r);
            if size + n > MAX_PACKET && size > base {
                flush(&mut msg, &mut size, &mut self.transmits);
            }
            size += n;
            if is_answer {
                msg.answers.push(r);
            } else {
                msg.additionals.push(r);
            }
        }
        flush(&mut msg, &mut size, &mut self.transmits);
    }
}
