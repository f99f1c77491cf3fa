//! A sans-IO DNS-SD browser for one service type (RFC 6763 §4, RFC 6762 §5.2).
//!
//! The browser multicasts a PTR question for the service type at start and again after 1 s,
//! 2 s, 4 s … up to 60 s apart. It reads every response on the socket, solicited or not
//! (announcements, other queriers' answers), and caches the records that concern its service:
//! PTRs of the type, SRV and TXT of its instances, A of their hosts. An instance whose SRV, TXT
//! or address is missing is asked for them (SRV+TXT, or A of the SRV target) with the same
//! backoff. Records are refreshed by questions at 80 % and 90 % of their TTL and dropped when
//! it runs out; a goodbye (TTL 0) drops a record one second later (RFC 6762 §10.1), and a
//! cache-flush record does the same to older records of its name and type (§10.2).
//!
//! Events: [`BrowseEvent::Resolved`] once an instance has PTR, SRV, TXT and at least one IPv4
//! address; [`BrowseEvent::Updated`] when one of these changes afterwards;
//! [`BrowseEvent::Removed`] when it loses any of them.
//!
//! Call order: [`Browser::new`], then in any order [`Browser::handle_packet`] for every
//! datagram received and [`Browser::handle_timeout`] whenever [`Browser::poll_timeout`] has
//! passed; after each, drain [`Browser::poll_transmit`] (multicast queries) and
//! [`Browser::poll_event`]. Time is milliseconds on any monotonic clock the glue chooses.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use super::MDNS_PORT;
use super::responder::BadName;
use super::wire::{
    CLASS_IN, Message, Name, Question, RData, Record, TYPE_A, TYPE_PTR, TYPE_SRV, TYPE_TXT,
    txt_pairs,
};

/// First re-query interval, ms.
const FIRST_INTERVAL_MS: u64 = 1000;
/// Longest re-query interval, ms.
const MAX_INTERVAL_MS: u64 = 60_000;
/// How long a goodbye or a flushed record lingers, ms.
const LINGER_MS: u64 = 1000;
/// Records cached at most; further ones are dropped (and counted).
pub const MAX_CACHE: usize = 1024;
/// Events held for the glue at most; the oldest are dropped beyond.
const MAX_EVENTS: usize = 1024;

/// What a browser reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrowseEvent {
    /// An instance is complete: it has a host, at least one IPv4 address, a port and a TXT.
    Resolved(ResolvedService),
    /// A resolved instance changed host, addresses, port or TXT.
    Updated(ResolvedService),
    /// A resolved instance said goodbye or its records expired.
    Removed {
        /// The instance label (e.g. the node id).
        instance: String,
    },
}

/// A resolved service instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedService {
    /// The instance label (e.g. the node id), without the service type.
    pub instance: String,
    /// The full instance name, e.g. `n1._voicemesh._udp.local.`.
    pub fullname: String,
    /// The host name from the SRV record, e.g. `vm-n1.local.`.
    pub host: String,
    /// The host's IPv4 addresses, sorted.
    pub addrs: Vec<Ipv4Addr>,
    /// The SRV port.
    pub port: u16,
    /// The TXT key/value pairs in record order.
    pub txt: Vec<(String, String)>,
}

impl ResolvedService {
    /// The value of TXT key `key` (compared without case).
    pub fn txt(&self, key: &str) -> Option<&str> {
        self.txt
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrowserStats {
    /// Queries sent.
    pub queries: u64,
    /// Responses processed.
    pub responses: u64,
    /// Datagrams dropped because they could not be decoded.
    pub malformed: u64,
    /// Responses ignored because they did not come from port 5353 (RFC 6762 §6).
    pub wrong_port: u64,
    /// Records not cached because the cache was full.
    pub cache_full: u64,
}

#[derive(Debug)]
struct Cached {
    name: Name,
    data: RData,
    received: u64,
    ttl_ms: u64,
    expires: u64,
    refreshes_sent: u8,
}

impl Cached {
    /// When the next refresh question is due (80 %, then 90 % of the TTL).
    fn refresh_at(&self) -> Option<u64> {
        let pct = match self.refreshes_sent {
            0 => 80,
            1 => 90,
            _ => return None,
        };
        (self.ttl_ms > 0).then(|| self.received + self.ttl_ms * pct / 100)
    }
}

/// A re-query schedule.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: u64,
    interval: u64,
}

impl Backoff {
    fn new(now: u64) -> Backoff {
        Backoff {
            next: now,
            interval: FIRST_INTERVAL_MS,
        }
    }

    fn fire(&mut self, now: u64) {
        self.next = now + self.interval;
        self.interval = (self.interval * 2).min(MAX_INTERVAL_MS);
    }
}

#[derive(Debug)]
struct Instance {
    name: Name,
    reported: Option<ResolvedService>,
    /// Questions for missing records, while the instance is incomplete.
    resolve: Option<Backoff>,
}

/// The browser. See the module documentation for the call order.
#[derive(Debug)]
pub struct Browser {
    service: Name,
    ptr_query: Backoff,
    cache: Vec<Cached>,
    instances: Vec<Instance>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<BrowseEvent>,
    stats: BrowserStats,
}

impl Browser {
    /// A browser for `service_type` (e.g. `_voicemesh._udp.local.`); the first query is due
    /// at `now`.
    pub fn new(service_type: &str, now: u64) -> Result<Browser, BadName> {
        let service = Name::parse(service_type)
            .filter(|n| !n.labels().is_empty())
            .ok_or_else(|| BadName(service_type.to_owned()))?;
        Ok(Browser {
            service,
            ptr_query: Backoff::new(now),
            cache: Vec::new(),
            instances: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: BrowserStats::default(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> BrowserStats {
        self.stats
    }

    /// The next query to multicast.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<BrowseEvent> {
        self.events.pop_front()
    }

    /// When [`Browser::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.ptr_query.next;
        for i in &self.instances {
            if let Some(b) = i.resolve {
                t = t.min(b.next);
            }
        }
        for c in &self.cache {
            t = t.min(c.expires);
            if let Some(r) = c.refresh_at() {
                t = t.min(r);
            }
        }
        Some(t)
    }

    /// Expires records, sends the questions that are due.
    pub fn handle_timeout(&mut self, now: u64) {
        let before = self.cache.len();
        self.cache.retain(|c| c.expires > now);
        if self.cache.len() != before {
            self.reconcile(now);
        }
        let mut questions: Vec<Question> = Vec::new();
        let mut ask = |name: &Name, qtype: u16| {
            if !questions
                .iter()
                .any(|q| q.qtype == qtype && q.name == *name)
            {
                questions.push(Question {
                    name: name.clone(),
                    qtype,
                    qclass: CLASS_IN,
                    unicast_response: false,
                });
            }
        };
        if self.ptr_query.next <= now {
            ask(&self.service, TYPE_PTR);
            self.ptr_query.fire(now);
        }
        for idx in 0..self.instances.len() {
            let Some(mut b) = self.instances[idx].resolve else {
                continue;
            };
            if b.next > now {
                continue;
            }
            b.fire(now);
            self.instances[idx].resolve = Some(b);
            let name = self.instances[idx].name.clone();
            match self.srv_of(&name) {
                Some((_, target)) => {
                    if self.addrs_of(&target).is_empty() {
                        ask(&target, TYPE_A);
                    }
                }
                None => ask(&name, TYPE_SRV),
            }
            if self.txt_of(&name).is_none() {
                ask(&name, TYPE_TXT);
            }
        }
        for c in &mut self.cache {
            if c.refresh_at().is_some_and(|t| t <= now) {
                c.refreshes_sent += 1;
                // PTRs are refreshed by the PTR query schedule (at most 60 s apart).
                if c.data.rtype() != TYPE_PTR {
                    ask(&c.name, c.data.rtype());
                }
            }
        }
        if !questions.is_empty() {
            self.stats.queries += 1;
            self.transmits.push_back(
                Message {
                    questions,
                    ..Message::default()
                }
                .encode(),
            );
        }
    }

    /// Handles one received datagram: responses update the cache; queries are ignored.
    pub fn handle_packet(&mut self, now: u64, bytes: &[u8], from: SocketAddr) {
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        if !msg.is_response() {
            return;
        }
        if from.port() != MDNS_PORT {
            self.stats.wrong_port += 1;
            return;
        }
        self.stats.responses += 1;
        // PTRs first, so an instance's SRV and TXT in the same message are recognised, then
        // SRV, so its host's A records are.
        for pass in [TYPE_PTR, TYPE_SRV, TYPE_TXT, TYPE_A] {
            for r in msg.records().filter(|r| r.data.rtype() == pass) {
                if self.wanted(r) {
                    self.insert(now, r);
                }
            }
        }
        self.reconcile(now);
    }

    /// Whether `r` concerns this browser's service.
    fn wanted(&self, r: &Record) -> bool {
        if r.class != CLASS_IN {
            return false;
        }
        match &r.data {
            RData::Ptr(target) => r.name == self.service && target.parent() == self.service,
            RData::Srv { .. } | RData::Txt(_) => self.instances.iter().any(|i| i.name == r.name),
            RData::A(_) => self
                .cache
                .iter()
                .any(|c| matches!(&c.data, RData::Srv { target, .. } if *target == r.name)),
            RData::Other(_) => false,
        }
    }

    fn insert(&mut self, now: u64, r: &Record) {
        let rtype = r.data.rtype();
        if r.cache_flush {
            // RFC 6762 §10.2: older records of this name and type go in one second.
            for c in &mut self.cache {
                if c.name == r.name
                    && c.data.rtype() == rtype
                    && c.data != r.data
                    && c.received + LINGER_MS <= now
                {
                    c.expires = c.expires.min(now + LINGER_MS);
                }
            }
        }
        let (ttl_ms, expires) = if r.ttl == 0 {
            (0, now + LINGER_MS)
        } else {
            let ms = u64::from(r.ttl) * 1000;
            (ms, now + ms)
        };
        if let Some(c) = self
            .cache
            .iter_mut()
            .find(|c| c.name == r.name && c.data == r.data)
        {
            c.received = now;
            c.ttl_ms = ttl_ms;
            c.expires = expires;
            c.refreshes_sent = 0;
        } else if r.ttl > 0 {
            if self.cache.len() >= MAX_CACHE {
                self.stats.cache_full += 1;
                return;
            }
            self.cache.push(Cached {
                name: r.name.clone(),
                data: r.data.clone(),
                received: now,
                ttl_ms,
                expires,
                refreshes_sent: 0,
            });
            if let RData::Ptr(target) = &r.data
                && !self.instances.iter().any(|i| i.name == *target)
            {
                self.instances.push(Instance {
                    name: target.clone(),
                    reported: None,
                    resolve: None,
                });
            }
        }
    }

    fn srv_of(&self, name: &Name) -> Option<(u16, Name)> {
        self.cache.iter().find_map(|c| match &c.data {
            RData::Srv { port, target, .. } if c.name == *name => Some((*port, target.clone())),
            _ => None,
        })
    }

    fn txt_of(&self, name: &Name) -> Option<Vec<(String, String)>> {
        self.cache.iter().find_map(|c| match &c.data {
            RData::Txt(s) if c.name == *name => Some(txt_pairs(s)),
            _ => None,
        })
    }

    fn addrs_of(&self, host: &Name) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .cache
            .iter()
            .filter_map(|c| match c.data {
                RData::A(a) if c.name == *host => Some(a),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn has_ptr(&self, instance: &Name) -> bool {
        self.cache
            .iter()
            .any(|c| c.name == self.service && c.data == RData::Ptr(instance.clone()))
    }

    /// Compares every instance's records with what was last reported and emits events.
    fn reconcile(&mut self, now: u64) {
        let mut idx = 0;
        while idx < self.instances.len() {
            let name = self.instances[idx].name.clone();
            let present = self.has_ptr(&name);
            let current = if present { self.resolve(&name) } else { None };
            let inst = &mut self.instances[idx];
            match (&inst.reported, &current) {
                (None, Some(s)) => self.events.push_back(BrowseEvent::Resolved(s.clone())),
                (Some(old), Some(s)) if old != s => {
                    self.events.push_back(BrowseEvent::Updated(s.clone()))
                }
                (Some(old), None) => self.events.push_back(BrowseEvent::Removed {
                    instance: old.instance.clone(),
                }),
                _ => {}
            }
            inst.reported = current;
            if !present {
                self.instances.remove(idx);
                continue;
            }
            if inst.reported.is_some() {
                inst.resolve = None;
            } else if inst.resolve.is_none() {
                inst.resolve = Some(Backoff::new(now));
            }
            idx += 1;
        }
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    fn resolve(&self, name: &Name) -> Option<ResolvedService> {
        let (port, target) = self.srv_of(name)?;
        let txt = self.txt_of(name)?;
        let addrs = self.addrs_of(&target);
        if addrs.is_empty() {
            return None;
        }
        Some(ResolvedService {
            instance: name.first_label(),
            fullname: name.to_string(),
            host: target.to_string(),
            addrs,
            port,
            txt,
        })
    }
}
