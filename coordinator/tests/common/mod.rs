//! Fixtures shared by the coordinator's integration tests.

use std::sync::Arc;
use voicemesh_protocol::discovery;

/// A node's QUIC server with a self-signed certificate.
pub fn node_endpoint() -> quinn::Endpoint {
    let cert = rcgen::generate_simple_self_signed(vec!["voicemesh-node".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![discovery::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap()
}
