//! TLS: the broker serves its API over rustls with a certificate from the config (generated
//! here with rcgen); agents enroll over `wss`. Plain HTTP is refused unless asked for.

mod broker_support;

use std::sync::Arc;

use broker_support::*;
use futures_util::{SinkExt, StreamExt};
use steelyard_proto::api::{self, AgentHello, AgentMessage, BrokerMessage, Role, API_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn tls_stream(
    addr: std::net::SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake with the broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enroll_over_tls() {
    let dir = temp_dir("tls");
    let (certified, config) = tls_config(&dir);
    let broker = BrokerProcess::start(&dir, &config);
    let cert = certified.cert.der().clone();

    // HTTPS.
    let mut s = tls_stream(broker.addr, &cert).await;
    s.write_all(b"GET /v1/keys HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("ed25519"), "{body}");

    // WSS enrollment.
    let s = tls_stream(broker.addr, &cert).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/agent", s)
        .await
        .unwrap();
    let k = key(1);
    let hello = AgentMessage::Hello(AgentHello {
        version: API_VERSION,
        peer_id: "alice".into(),
        public_key: api::public_key_hex(&k.verifying_key()),
        enroll_token: Some(AGENT_TOKEN.into()),
        auto_accept: false,
    });
    ws.send(Message::Text(api::encode(&hello).into()))
        .await
        .unwrap();
    let next = |m: Option<Result<Message, _>>| match m {
        Some(Ok(Message::Text(t))) => api::decode_broker(&t, usize::MAX).unwrap(),
        other => panic!("{other:?}"),
    };
    let BrokerMessage::Challenge(c) = next(ws.next().await) else {
        panic!("no challenge")
    };
    let proof = api::sign_auth(&k, Role::Agent, "alice", &c.nonce).unwrap();
    ws.send(Message::Text(
        api::encode(&AgentMessage::Auth(proof)).into(),
    ))
    .await
    .unwrap();
    let BrokerMessage::Welcome(w) = next(ws.next().await) else {
        panic!("no welcome")
    };
    assert!(w.enrolled);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    plain
        .write_all(b"GET /v1/keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut raw),
    )
    .await;
    assert!(
        !raw.starts_with(b"HTTP/1.1 200"),
        "plain HTTP must not be served"
    );
    broker.stop();
}

#[test]
fn no_tls_and_no_plain_opt_in_is_a_startup_error() {
    let dir = temp_dir("notls");
    let config = base_config(&dir).replace("listen_plain = true\n", "");
    std::fs::write(dir.join("b.toml"), config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["broker", "--config"])
        .arg(dir.join("b.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_plain"), "{err}");

    std::fs::write(dir.join("c.toml"), "listen_plain = true\nunknown_key = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["broker", "--config"])
        .arg(dir.join("c.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown_key"), "{err}");
}

#[test]
fn flags_win_over_environment_which_wins_over_the_file() {
    let dir = temp_dir("overrides");
    std::fs::write(
        dir.join("b.toml"),
        "listen = \"127.0.0.1:1111\"\nlisten_plain = true\nstore = \"memory\"\n",
    )
    .unwrap();
    let shown = stdout_of(
        std::process::Command::new(env!("CARGO_BIN_EXE_steelyard"))
            .args([
                "broker",
                "--print-config",
                "--listen",
                "127.0.0.1:3333",
                "--config",
            ])
            .arg(dir.join("b.toml"))
            .env("STEELYARD_BROKER_LISTEN", "127.0.0.1:2222")
            .env("STEELYARD_BROKER_STORE", "sqlite")
            .env("STEELYARD_BROKER_ADMIN_TOKEN", "env-admin-token-0123456789"),
    );
    assert!(shown.contains("listen = \"127.0.0.1:3333\""), "{shown}");
    assert!(shown.contains("store = \"sqlite\""), "{shown}");
    assert!(shown.contains("admin_token = \"***\""), "{shown}");
    assert!(
        !shown.contains("env-admin-token"),
        "secrets are masked: {shown}"
    );
}
