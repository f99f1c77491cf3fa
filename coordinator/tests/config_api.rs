//! The configuration API of an in-process coordinator on 127.0.0.1: PUT/GET round trips,
//! persistence across a restart on the same state directory, validation, auth, corrupt files,
//! and `/voicemesh/panic` still accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rosc::{OscMessage, OscPacket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use voicemesh_coordinator::{CoordinatorConfig, RunningCoordinator, StartError, start};
use voicemesh_node::clock::ClusterClock;
use voicemesh_tests::TempDir;

async fn coordinator(dir: &TempDir) -> Result<(RunningCoordinator, CancellationToken), StartError> {
    let mut cfg = CoordinatorConfig::new(dir.0.clone());
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.osc = "127.0.0.1:0".parse().unwrap();
    let shutdown = CancellationToken::new();
    let c = start(cfg, Arc::new(ClusterClock::new()), shutdown.clone()).await?;
    Ok((c, shutdown))
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

const CV: &str = r#"{
  "voices": [{"node": "teensy-1", "voice": 0,
              "pitch": {"node": "teensy-1", "channel": 0},
              "gate": {"node": "teensy-1", "channel": 1},
              "gate_mode": {"mode": "trigger", "ms": 10}}],
  "routes": [{"source": {"type": "clock", "ppqn": 24, "pulse_ms": 5},
              "output": {"node": "teensy-1", "channel": 2}}],
  "calibration": [{"output": {"node": "teensy-1", "channel": 0},
                   "points": [{"volts": -5.0, "code": 0}, {"volts": 5.0, "code": 65535}]}]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_round_trip_persists_across_restart() {
    let dir = TempDir::new("vm-config-api");
    let (c, stop) = coordinator(&dir).await.expect("starts");
    let (addr, token) = (c.http_addr(), c.token().to_owned());
    let t = Some(token.as_str());
    let file = dir.0.join("config.json");
    assert!(!file.exists(), "no file until the first change");

    let (st, v) = request(addr, "GET", "/api/config/policy", t, "").await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        serde_json::json!({"policy": "round_robin", "steal": "oldest"})
    );

    let (st, v) = request(
        addr,
        "PUT",
        "/api/config/policy",
        t,
        r#"{"policy":"least_loaded","steal":"quietest"}"#,
    )
    .await;
    assert_eq!(
        (st, &v["policy"]),
        (200, &serde_json::json!("least_loaded"))
    );
    let first = std::fs::read_to_string(&file).expect("written");
    assert!(first.contains("least_loaded"));

    let channels = r#"[{"channel":1,"nodes":["pi-a"],"unison":2,"key_range":[0,59]}]"#;
    let (st, _) = request(addr, "PUT", "/api/config/channels", t, channels).await;
    assert_eq!(st, 200);
    let (st, v) = request(addr, "GET", "/api/config/channels", t, "").await;
    assert_eq!(st, 200);
    assert_eq!(v[0]["unison"], 2);
    assert_eq!(v[0]["key_range"], serde_json::json!([0, 59]));

    let (st, _) = request(addr, "PUT", "/api/config/cv", t, CV).await;
    assert_eq!(st, 200);
    let (_, cv) = request(addr, "GET", "/api/config/cv", t, "").await;
    assert_eq!(cv["routes"][0]["source"]["ppqn"], 24);
    assert_eq!(cv["calibration"][0]["points"][1]["code"], 65535);

    // The file is replaced whole (rename), is valid JSON with the schema version at every
    // step, and no temporary file is left behind.
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(on_disk["version"], 1);
    assert_eq!(on_disk["cv"], cv);
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let (st, whole) = request(addr, "GET", "/api/config", t, "").await;
    assert_eq!(st, 200);
    assert_eq!(whole, on_disk);

    stop.cancel();
    c.wait().await.unwrap();

    // Restart on the same state directory: everything is back.
    let (c, stop) = coordinator(&dir).await.expect("restarts");
    let (addr, token) = (c.http_addr(), c.token().to_owned());
    let t = Some(token.as_str());
    let (_, v) = request(addr, "GET", "/api/config/policy", t, "").await;
    assert_eq!(
        v,
        serde_json::json!({"policy": "least_loaded", "steal": "quietest"})
    );
    let (_, v) = request(addr, "GET", "/api/config/channels", t, "").await;
    assert_eq!(v[0]["nodes"], serde_json::json!(["pi-a"]));
    let (_, v) = request(addr, "GET", "/api/config/cv", t, "").await;
    assert_eq!(v, cv);
    stop.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_naming_the_field_and_changes_nothing() {
    let dir = TempDir::new("vm-config-api");
    let (c, stop) = coordinator(&dir).await.expect("starts");
    let (addr, token) = (c.http_addr(), c.token().to_owned());
    let t = Some(token.as_str());
    for (path, body, field) in [
        ("/api/config/policy", "{not json", ""),
        ("/api/config/policy", r#"{"policy":"fastest"}"#, "policy"),
        ("/api/config/policy", r#"{"polcy":"round_robin"}"#, "polcy"),
        ("/api/config/channels", r#"[{"channel":16}]"#, "[0].channel"),
        ("/api/config/channels", r#"[{"chanel":1}]"#, "[0].chanel"),
        ("/api/config/channels", r#"{"channel":1}"#, ""),
        (
            "/api/config/channels",
            r#"[{"channel":0,"key_range":[70,60]}]"#,
            "[0].key_range",
        ),
        (
            "/api/config/cv",
            r#"{"voices":[{"node":"m","voice":"zero"}]}"#,
            "voices[0].voice",
        ),
        (
            "/api/config/cv",
            r#"{"routes":[{"source":{"type":"clock","ppqn":500,"pulse_ms":5},"output":{"node":"m","channel":0}}]}"#,
            "routes[0].source.ppqn",
        ),
        (
            "/api/config/cv",
            r#"{"calibration":[{"output":{"node":"m","channel":0},"points":[{"volts":1,"code":5},{"volts":0,"code":9}]}]}"#,
            "calibration[0].points[1].volts",
        ),
    ] {
        let (st, v) = request(addr, "PUT", path, t, body).await;
        assert_eq!(st, 400, "{path} {body}: {v}");
        assert_eq!(v["field"], field, "{path} {body}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        if path.ends_with("policy") && body.contains("polcy") {
            assert!(v["error"].as_str().unwrap().contains("polcy"), "{v}");
        }
    }
    assert!(!dir.0.join("config.json").exists(), "nothing was saved");

    // No token, wrong token: 401 for reads and writes.
    for (method, body) in [("GET", ""), ("PUT", r#"{"policy":"least_loaded"}"#)] {
        let (st, _) = request(addr, method, "/api/config/policy", None, body).await;
        assert_eq!(st, 401);
        let (st, _) = request(
            addr,
            method,
            "/api/config/cv",
            Some("wrong-token-0123456789"),
            body,
        )
        .await;
        assert_eq!(st, 401);
    }
    let (_, v) = request(addr, "GET", "/api/config/policy", t, "").await;
    assert_eq!(v["policy"], "round_robin");

    // `/voicemesh/panic` is still accepted (not counted as dropped).
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let panic = rosc::encoder::encode(&OscPacket::Message(OscMessage {
        addr: "/voicemesh/panic".into(),
        args: vec![],
    }))
    .unwrap();
    sock.send_to(&panic, c.osc_addr()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let s = c.snapshot();
        if s.osc.received == 1 {
            assert!(s.osc.dropped.values().all(|&n| n == 0), "{:?}", s.osc);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "panic not received");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    c.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_config_stops_the_start_naming_the_path() {
    let dir = TempDir::new("vm-config-api");
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("config.json");
    for (content, want) in [
        ("{\"version\":1,\"policy\":", "corrupt configuration file"),
        ("{\"version\":7}", "schema version 7"),
    ] {
        std::fs::write(&file, content).unwrap();
        let e = coordinator(&dir).await.expect_err("refused").to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains(want), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), content, "kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_partial_file() {
    let dir = TempDir::new("vm-config-api");
    let (c, stop) = coordinator(&dir).await.expect("starts");
    let (addr, token) = (c.http_addr(), c.token().to_owned());
    let file = dir.0.join("config.json");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (file, done) = (file.clone(), done.clone());
        std::thread::spawn(move || {
            let mut complete = 0u32;
            while !done.load(Ordering::Relaxed) {
                match std::fs::read(&file) {
                    Ok(b) => {
                        let v: serde_json::Value = serde_json::from_slice(&b)
                            .unwrap_or_else(|e| panic!("partial config.json ({e}): {b:?}"));
                        assert_eq!(v["version"], 1);
                        complete += 1;
                    }
                    Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
                }
            }
            complete
        })
    };
    for i in 0..40 {
        let body = if i % 2 == 0 { CV } else { "{}" };
        let (st, v) = request(addr, "PUT", "/api/config/cv", Some(&token), body).await;
        assert_eq!(st, 200, "{v}");
    }
    done.store(true, Ordering::Relaxed);
    let complete = reader.join().expect("reader saw only whole files");
    assert!(complete > 0);
    let (_, v) = request(addr, "GET", "/api/config/cv", Some(&token), "").await;
    assert_eq!(v["voices"], serde_json::json!([]));
    stop.cancel();
    c.wait().await.unwrap();
}
