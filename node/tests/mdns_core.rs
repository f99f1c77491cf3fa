//! The sans-IO mDNS cores in a simulated exchange: a responder and a browser pass datagrams
//! through a lossless "link" in simulated milliseconds. No sockets.

use std::net::{Ipv4Addr, SocketAddr};

use voicemesh_node::mdns::responder::{HOST_TTL, SERVICES_ENUMERATION};
use voicemesh_node::mdns::wire::{
    CLASS_IN, Message, Name, Question, RData, TYPE_A, TYPE_PTR, TYPE_SRV, TYPE_TXT,
};
use voicemesh_node::mdns::{
    BrowseEvent, Browser, Destination, NodeTxt, Responder, ServiceInstance, Transmit,
};
use voicemesh_protocol::discovery::NODE_SERVICE;

const ADDR: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);

fn mdns_peer(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 1, 2, last], 5353))
}

fn node(id: &str, port: u16) -> ServiceInstance {
    NodeTxt {
        id: id.into(),
        voices: 8,
        cv: 0,
        engines: vec!["saw".into()],
        port,
    }
    .instance()
}

/// One responder and one browser on a perfect link, with simulated time.
struct World {
    now: u64,
    responder: Option<Responder>,
    browser: Browser,
    events: Vec<(u64, BrowseEvent)>,
    datagrams: usize,
}

impl World {
    fn new(instances: &[ServiceInstance], browser_at: u64) -> World {
        let mut responder = Responder::new(instances, ADDR).unwrap();
        responder.start(0);
        World {
            now: 0,
            responder: Some(responder),
            browser: Browser::new(NODE_SERVICE, browser_at).unwrap(),
            events: Vec::new(),
            datagrams: 0,
        }
    }

    /// Delivers everything queued, both ways, until quiet.
    fn exchange(&mut self) {
        loop {
            let mut moved = false;
            if let Some(r) = self.responder.as_mut() {
                while let Some(t) = r.poll_transmit() {
                    assert_eq!(t.destination, Destination::Multicast);
                    self.browser
                        .handle_packet(self.now, &t.payload, mdns_peer(3));
                    self.datagrams += 1;
                    moved = true;
                }
            }
            while let Some(q) = self.browser.poll_transmit() {
                self.datagrams += 1;
                moved = true;
                if let Some(r) = self.responder.as_mut()
                    && let Some(t) = r.handle_query(self.now, &q, mdns_peer(9))
                {
                    self.browser
                        .handle_packet(self.now, &t.payload, mdns_peer(3));
                }
            }
            while let Some(e) = self.browser.poll_event() {
                self.events.push((self.now, e));
            }
            if !moved {
                return;
            }
        }
    }

    /// Runs until simulated time `until`, jumping from deadline to deadline.
    fn run_until(&mut self, until: u64) {
        loop {
            self.exchange();
            let next = [
                self.responder.as_ref().and_then(Responder::poll_timeout),
                self.browser.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    if let Some(r) = self.responder.as_mut() {
                        r.handle_timeout(self.now);
                    }
                    self.browser.handle_timeout(self.now);
                }
                _ => {
                    self.now = until;
                    return;
                }
            }
        }
    }
}

#[test]
fn browser_resolves_from_the_announcement_and_sees_the_goodbye() {
    let mut w = World::new(&[node("n1", 4433)], 0);
    w.run_until(10);
    let (at, ev) = &w.events[0];
    assert_eq!(*at, 0, "resolved by the first exchange");
    let BrowseEvent::Resolved(s) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(s.instance, "n1");
    assert_eq!(s.fullname, "n1._voicemesh._udp.local.");
    assert_eq!(s.host, "vm-n1.local.");
    assert_eq!(s.addrs, vec![ADDR]);
    assert_eq!(s.port, 4433);
    let keys: Vec<&str> = s.txt.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, voicemesh_protocol::discovery::TXT_KEYS);
    assert_eq!(s.txt("port"), Some("4433"));
    assert_eq!(w.events.len(), 1);

    // An hour of re-queries and refreshes: still exactly one event, and the query interval
    // has backed off (1, 2, 4, … 60 s): about 60 PTR queries, not 3600.
    w.run_until(3_600_000);
    assert_eq!(w.events.len(), 1, "{:?}", w.events);
    let queries = w.browser.stats().queries;
    assert!(
        (55..=150).contains(&queries),
        "{queries} queries in an hour"
    );

    // Goodbye: removed one second later (RFC 6762 §10.1).
    let mut r = w.responder.take().unwrap();
    r.stop();
    let bye = r.poll_transmit().unwrap();
    assert!(
        Message::decode(&bye.payload)
            .unwrap()
            .records()
            .all(|r| r.ttl == 0)
    );
    let t0 = w.now;
    w.browser.handle_packet(t0, &bye.payload, mdns_peer(3));
    w.run_until(t0 + 2000);
    assert_eq!(
        w.events.last().unwrap(),
        &(
            t0 + 1000,
            BrowseEvent::Removed {
                instance: "n1".into()
            }
        )
    );
}

#[test]
fn browser_started_late_queries_and_instances_expire_without_refresh() {
    // The browser misses both announcements (they happen before it exists).
    let mut w = World::new(&[node("a", 1), node("b", 2)], 5_000);
    let mut r = w.responder.take().unwrap();
    r.handle_timeout(0);
    r.handle_timeout(1000);
    while r.poll_transmit().is_some() {}
    w.responder = Some(r);
    w.now = 5_000;
    w.run_until(5_001);
    let mut resolved: Vec<String> = w
        .events
        .iter()
        .map(|(at, e)| match e {
            BrowseEvent::Resolved(s) => {
                assert_eq!(*at, 5_000);
                s.instance.clone()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    resolved.sort();
    assert_eq!(resolved, ["a", "b"]);

    // The responder vanishes without a goodbye: the SRV/A TTL (120 s) runs out despite the
    // refresh questions at 80 % and 90 %.
    w.responder = None;
    w.run_until(5_000 + u64::from(HOST_TTL) * 1000 + 1);
    let removed = w
        .events
        .iter()
        .filter(|(_, e)| matches!(e, BrowseEvent::Removed { .. }))
        .count();
    assert_eq!(removed, 2, "{:?}", w.events);
}

#[test]
fn browser_asks_for_what_it_is_missing() {
    // A PTR alone (as a foreign responder might send it).
    let service = Name::parse(NODE_SERVICE).unwrap();
    let instance = service.child(b"lone").unwrap();
    let mut b = Browser::new(NODE_SERVICE, 0).unwrap();
    b.handle_timeout(0);
    b.poll_transmit().unwrap();
    let ptr = Message {
        flags: 0x8400,
        answers: vec![voicemesh_node::mdns::wire::Record {
            name: service.clone(),
            class: CLASS_IN,
            cache_flush: false,
            ttl: 4500,
            data: RData::Ptr(instance.clone()),
        }],
        ..Message::default()
    };
    b.handle_packet(10, &ptr.encode(), mdns_peer(3));
    assert!(b.poll_event().is_none());
    b.handle_timeout(10);
    let q = Message::decode(&b.poll_transmit().unwrap()).unwrap();
    let asked: Vec<(String, u16)> = q
        .questions
        .iter()
        .map(|q| (q.name.to_string(), q.qtype))
        .collect();
    assert_eq!(
        asked,
        [
            ("lone._voicemesh._udp.local.".to_string(), TYPE_SRV),
            ("lone._voicemesh._udp.local.".to_string(), TYPE_TXT)
        ]
    );
    // A response from a port other than 5353 is ignored (RFC 6762 §6).
    b.handle_packet(20, &ptr.encode(), SocketAddr::from(([10, 1, 2, 3], 40000)));
    assert_eq!(b.stats().wrong_port, 1);
    // Garbage is counted, not fatal.
    b.handle_packet(20, &[0xFF; 7], mdns_peer(3));
    assert_eq!(b.stats().malformed, 1);
}

fn query(qs: &[(&str, u16)]) -> Message {
    Message {
        id: 0x4242,
        questions: qs
            .iter()
            .map(|(n, t)| Question {
                name: Name::parse(n).unwrap(),
                qtype: *t,
                qclass: CLASS_IN,
                unicast_response: false,
            })
            .collect(),
        ..Message::default()
    }
}

fn answer(
    r: &mut Responder,
    now: u64,
    q: &Message,
    from: SocketAddr,
) -> Option<(Transmit, Message)> {
    let t = r.handle_query(now, &q.encode(), from)?;
    let m = Message::decode(&t.payload).unwrap();
    Some((t, m))
}

#[test]
fn responder_answers_ptr_with_additionals_enumeration_legacy_and_known_answers() {
    let mut r = Responder::new(&[node("n1", 4433)], ADDR).unwrap();
    r.start(0);
    // Queries for names we do not own get nothing.
    assert!(
        answer(
            &mut r,
            5000,
            &query(&[("_http._tcp.local.", TYPE_PTR)]),
            mdns_peer(9)
        )
        .is_none()
    );

    let (t, m) = answer(
        &mut r,
        5000,
        &query(&[(NODE_SERVICE, TYPE_PTR)]),
        mdns_peer(9),
    )
    .unwrap();
    assert_eq!(t.destination, Destination::Multicast);
    assert_eq!((m.id, m.flags), (0, 0x8400));
    assert_eq!(m.answers.len(), 1);
    let types: Vec<u16> = m.additionals.iter().map(|r| r.data.rtype()).collect();
    assert_eq!(types, [TYPE_SRV, TYPE_TXT, TYPE_A]);
    assert!(m.additionals.iter().all(|r| r.cache_flush));
    assert!(!m.answers[0].cache_flush);

    // The same question again within a second: rate-limited (RFC 6762 §6).
    assert!(
        answer(
            &mut r,
            5500,
            &query(&[(NODE_SERVICE, TYPE_PTR)]),
            mdns_peer(9)
        )
        .is_none()
    );

    // Service type enumeration (RFC 6763 §9).
    let (_, m) = answer(
        &mut r,
        7000,
        &query(&[(SERVICES_ENUMERATION, TYPE_PTR)]),
        mdns_peer(9),
    )
    .unwrap();
    assert_eq!(
        m.answers[0].data,
        RData::Ptr(Name::parse(NODE_SERVICE).unwrap())
    );

    // Legacy unicast: source port ≠ 5353 → unicast to it, same id, question echoed, TTL ≤ 10.
    let legacy = SocketAddr::from(([127, 0, 0, 1], 40000));
    let (t, m) = answer(&mut r, 7100, &query(&[("vm-n1.local.", TYPE_A)]), legacy).unwrap();
    assert_eq!(t.destination, Destination::Unicast(legacy));
    assert_eq!(m.id, 0x4242);
    assert_eq!(m.questions.len(), 1);
    assert_eq!(m.answers[0].data, RData::A(ADDR));
    assert!(m.answers[0].ttl <= 10 && !m.answers[0].cache_flush);

    // Known-answer suppression (RFC 6762 §7.1): the querier holds the PTR with > half TTL.
    let mut q = query(&[(NODE_SERVICE, TYPE_PTR)]);
    q.answers = m_ptr(&mut r, 9000);
    assert!(answer(&mut r, 20_000, &q, mdns_peer(9)).is_none());
    assert_eq!(r.stats().suppressed, 1);
    // A known answer with too little TTL left does not suppress.
    q.answers[0].ttl = 100;
    assert!(answer(&mut r, 30_000, &q, mdns_peer(9)).is_some());
    // Malformed input is counted.
    assert!(r.handle_query(40_000, &[1, 2, 3], mdns_peer(9)).is_none());
    assert_eq!(r.stats().malformed, 1);
}

/// Our PTR record as a querier would list it as a known answer.
fn m_ptr(r: &mut Responder, now: u64) -> Vec<voicemesh_node::mdns::wire::Record> {
    let (_, m) = answer(r, now, &query(&[(NODE_SERVICE, TYPE_PTR)]), mdns_peer(9)).unwrap();
    m.answers
}

#[test]
fn announcements_twice_one_second_apart_then_silence() {
    let mut r = Responder::new(&[node("n1", 1)], ADDR).unwrap();
    r.start(100);
    let mut sent = Vec::new();
    while let Some(t) = r.poll_timeout() {
        r.handle_timeout(t);
        while let Some(x) = r.poll_transmit() {
            sent.push((t, Message::decode(&x.payload).unwrap()));
        }
    }
    assert_eq!(
        sent.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        [100, 1100]
    );
    for (_, m) in &sent {
        let mut types: Vec<u16> = m.answers.iter().map(|r| r.data.rtype()).collect();
        types.sort();
        assert_eq!(types, [TYPE_A, TYPE_PTR, TYPE_PTR, TYPE_TXT, TYPE_SRV]);
    }
}

#[test]
fn many_instances_split_into_datagrams_that_fit() {
    let many: Vec<ServiceInstance> = (0..40)
        .map(|i| node(&format!("node-{i:02}"), 1000 + i))
        .collect();
    let mut w = World::new(&many, 0);
    w.run_until(10);
    assert!(w.datagrams > 1);
    assert_eq!(w.events.len(), 40);
}
