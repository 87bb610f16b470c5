//! Events out (issue 19): relays deliver the outbox to a real HTTP receiver started here (it
//! checks each `Billing-Signature` with its own HMAC), and to the NATS JetStream server at
//! 127.0.0.1:4222 (`.ci/run` starts one).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use hmac::{Hmac, Mac};
use proto::common::v1::{
    ListDeliveriesRequest, RetryDeadLetterRequest, event_delivery_client::EventDeliveryClient,
    event_delivery_server::EventDelivery,
};
use runtime::{
    clock::ServiceClock,
    config::{RetryPolicy, ServiceDefaults, WebhookConfig},
    db::Db,
    event_delivery::EventDeliveryService,
    metrics::{Metrics, SinkLabels},
    outbox::{self, Outbox},
    relay::{self, Relay, Sink, nats::NatsSink, webhook::WebhookSink},
    testing::{ADMIN_TOKEN, READ_TOKEN, TestDatabase, authed},
};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::fresh_db;

const SECRET: &str = "whsec_test_0123456789abcdef";

/// What the receiver does with a delivery.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Verify and answer 200.
    Accept,
    /// Answer 503 (a receiver that is up but failing).
    Fail,
}

/// One delivery the receiver took (signature verified).
#[derive(Clone, Debug)]
struct Got {
    id: String,
    cursor: i64,
    event_type: String,
    body: Value,
}

/// A webhook receiver: checks the signature with `secret` exactly as a platform would.
struct Receiver {
    secret: Vec<u8>,
    mode: Mutex<Mode>,
    got: Mutex<Vec<Got>>,
    bad_signatures: Mutex<usize>,
    /// Answers the first delivery of this cursor only after the delay.
    slow: Mutex<Option<(i64, Duration)>>,
}

impl Receiver {
    fn new(secret: &str) -> Arc<Self> {
        Arc::new(Self {
            secret: secret.as_bytes().to_vec(),
            mode: Mutex::new(Mode::Accept),
            got: Mutex::new(Vec::new()),
            bad_signatures: Mutex::new(0),
            slow: Mutex::new(None),
        })
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn cursors(&self) -> Vec<i64> {
        self.got().iter().map(|g| g.cursor).collect()
    }

    /// Serves on `addr` until the test ends.
    async fn serve_on(self: &Arc<Self>, addr: SocketAddr) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(Arc::clone(self));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    async fn serve(self: &Arc<Self>) -> SocketAddr {
        self.serve_on("127.0.0.1:0".parse().unwrap()).await
    }
}

/// The receiver's own check: HMAC-SHA256(secret, "<t>.<body>") against `v1`.
fn signature_ok(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        if let Some(v) = part.strip_prefix("t=") {
            t = Some(v.to_string());
        }
        if let Some(v) = part.strip_prefix("v1=") {
            v1 = Some(v.to_string());
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(t_num) = t.parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - t_num).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let Ok(sent) = hex::decode(v1) else {
        return false;
    };
    mac.verify_slice(&sent).is_ok()
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if *r.mode.lock().unwrap() == Mode::Fail {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = headers
        .get("billing-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !signature_ok(&r.secret, header, &body) {
        *r.bad_signatures.lock().unwrap() += 1;
        return StatusCode::BAD_REQUEST;
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    let got = Got {
        id: v["id"].as_str().unwrap().to_string(),
        cursor: v["cursor"].as_i64().unwrap(),
        event_type: v["type"].as_str().unwrap().to_string(),
        body: v,
    };
    let cursor = got.cursor;
    r.got.lock().unwrap().push(got);
    let delay = {
        let mut slow = r.slow.lock().unwrap();
        match *slow {
            Some((c, d)) if c == cursor => {
                *slow = None;
                Some(d)
            }
            _ => None,
        }
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    StatusCode::OK
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        give_up_after: Duration::from_secs(3600),
    }
}

fn webhook(name: &str, addr: SocketAddr, secret: &str, types: &[&str]) -> Arc<dyn Sink> {
    Arc::new(
        WebhookSink::new(&WebhookConfig {
            name: name.into(),
            url: format!("http://{addr}/hook"),
            secret: secret.into(),
            event_types: types.iter().map(|t| t.to_string()).collect(),
        })
        .unwrap(),
    )
}

struct Events {
    db: Db,
    outbox: Outbox,
    metrics: Arc<Metrics>,
}

impl Events {
    fn new(db: &Db) -> Self {
        let metrics = Metrics::new("test");
        let clock = ServiceClock::test(chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap());
        Self {
            db: db.clone(),
            outbox: Outbox::new(db.clone(), clock, Arc::clone(&metrics)),
            metrics,
        }
    }

    /// Commits `n` events (types alternating `a.one`, `b.two`) and numbers them.
    async fn append(&self, n: usize, from: usize) {
        let mut tx = self.db.begin_write().await.unwrap();
        for i in from..from + n {
            let t = if i % 2 == 0 { "a.one" } else { "b.two" };
            outbox::append(&mut tx, t, &format!("s{i}"), &json!({ "i": i }), 1)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        while self.outbox.relay_once().await.unwrap() > 0 {}
    }

    fn relay(&self, sink: Arc<dyn Sink>, policy: RetryPolicy) -> Relay {
        Relay::new(
            self.db.clone(),
            &self.outbox,
            sink,
            policy,
            Arc::clone(&self.metrics),
        )
    }
}

/// Waits up to 20 s for `done`.
async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn acked(db: &Db, sink: &str) -> i64 {
    relay::sink_state(db, sink)
        .await
        .unwrap()
        .map_or(0, |s| s.acked_cursor)
}

#[tokio::test]
async fn a_webhook_gets_every_event_in_cursor_order_signed_and_filtered_by_type() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    let all = Receiver::new(SECRET);
    let only_b = Receiver::new(SECRET);
    let (a1, a2) = (all.serve().await, only_b.serve().await);
    let stop = CancellationToken::new();
    let r1 = ev
        .relay(webhook("all", a1, SECRET, &[]), fast_retries())
        .spawn(stop.clone());
    let r2 = ev
        .relay(webhook("only-b", a2, SECRET, &["b.two"]), fast_retries())
        .spawn(stop.clone());
    ev.append(15, 0).await;
    ev.append(15, 15).await;

    until("30 events at the first endpoint", || async {
        all.got().len() >= 30
    })
    .await;
    until("both sinks at the head", || async {
        acked(&db, "webhook:only-b").await == 30
    })
    .await;
    assert_eq!(
        all.cursors(),
        (1..=30).collect::<Vec<_>>(),
        "in cursor order, each once"
    );
    let ids: std::collections::HashSet<_> = all.got().iter().map(|g| g.id.clone()).collect();
    assert_eq!(ids.len(), 30, "distinct ids");
    let first = &all.got()[0].body;
    assert_eq!(first["type"], "a.one");
    assert_eq!(first["subject"], "s0");
    assert_eq!(first["payload"], json!({"i": 0}));
    assert_eq!(first["created_at"], "1970-01-01T00:00:00.000001Z");
    assert!(
        only_b.got().iter().all(|g| g.event_type == "b.two"),
        "the filter holds"
    );
    assert_eq!(
        only_b.cursors(),
        (1..=30).filter(|c| c % 2 == 0).collect::<Vec<_>>(),
        "odd positions (even i) are a.one, skipped; the cursor moves past them"
    );
    assert_eq!(*all.bad_signatures.lock().unwrap(), 0);
    // The counter moves just after the commit that acknowledges: wait for it, do not race it.
    until("30 delivered in the metrics", || async {
        ev.metrics
            .relay_delivered
            .get_or_create(&SinkLabels {
                sink: "webhook:all".into(),
            })
            .get()
            == 30
    })
    .await;
    stop.cancel();
    r1.await.unwrap();
    r2.await.unwrap();
}

#[tokio::test]
async fn a_receiver_down_for_a_while_then_back_loses_nothing_and_keeps_the_order() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    // A port with nothing listening: connections are refused.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let receiver = Receiver::new(SECRET);
    let stop = CancellationToken::new();
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .spawn(stop.clone());
    ev.append(5, 0).await;
    until("failed attempts recorded", || async {
        relay::sink_state(&db, "webhook:platform")
            .await
            .unwrap()
            .is_some_and(|s| s.attempts >= 3)
    })
    .await;
    let state = relay::sink_state(&db, "webhook:platform")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.acked_cursor, 0, "nothing acknowledged while down");
    assert!(
        state.last_error.unwrap().contains("POST"),
        "the error is kept"
    );

    // Up, but answering 503 for a while; events keep coming.
    receiver.set(Mode::Fail);
    receiver.serve_on(addr).await;
    ev.append(5, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.got().is_empty());
    receiver.set(Mode::Accept);
    ev.append(5, 10).await;
    until("all 15", || async { receiver.got().len() >= 15 }).await;
    until("cursor at the head", || async {
        acked(&db, "webhook:platform").await == 15
    })
    .await;
    assert_eq!(receiver.cursors(), (1..=15).collect::<Vec<_>>());
    let state = relay::sink_state(&db, "webhook:platform")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (state.attempts, state.last_error),
        (0, None),
        "failure state cleared"
    );
    assert!(
        ev.metrics
            .relay_failures
            .get_or_create(&SinkLabels {
                sink: "webhook:platform".into()
            })
            .get()
            >= 3
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_receiver_with_the_wrong_secret_refuses_every_delivery() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    // The receiver checks with another secret than the service signs with.
    let receiver = Receiver::new("whsec_some_other_secret_000");
    let addr = receiver.serve().await;
    let stop = CancellationToken::new();
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .spawn(stop.clone());
    ev.append(2, 0).await;
    until("refusals", || async {
        *receiver.bad_signatures.lock().unwrap() >= 2
    })
    .await;
    assert!(receiver.got().is_empty(), "nothing accepted");
    let state = relay::sink_state(&db, "webhook:platform")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.acked_cursor, 0, "a refusal is not an acknowledgement");
    assert!(
        state.last_error.as_deref().unwrap().contains("400"),
        "{:?}",
        state.last_error
    );
    stop.cancel();
    task.await.unwrap();

    // The same check with the right secret accepts what the service signs.
    let body = br#"{"id":"x"}"#;
    let header =
        runtime::relay::webhook::sign(SECRET.as_bytes(), chrono::Utc::now().timestamp(), body);
    assert!(signature_ok(SECRET.as_bytes(), &header, body));
    assert!(!signature_ok(b"whsec_some_other_secret_000", &header, body));
}

#[tokio::test]
async fn past_its_retry_budget_an_event_is_dead_lettered_and_can_be_retried_once_asked() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    let receiver = Receiver::new(SECRET);
    receiver.set(Mode::Fail);
    let addr = receiver.serve().await;
    let policy = RetryPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(50),
        give_up_after: Duration::from_millis(300),
    };
    let stop = CancellationToken::new();
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), policy)
        .spawn(stop.clone());
    ev.append(3, 0).await;
    until("three dead letters", || async {
        relay::dead_letters(&db, "", 0, 100).await.unwrap().len() == 3
    })
    .await;
    assert_eq!(
        acked(&db, "webhook:platform").await,
        3,
        "the sink moved past them"
    );
    let dead = relay::dead_letters(&db, "webhook:platform", 0, 100)
        .await
        .unwrap();
    assert_eq!(dead.iter().map(|d| d.cursor).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(dead.iter().all(|d| d.state == "dead" && d.attempts >= 2));
    assert!(dead[0].last_error.contains("503"), "{}", dead[0].last_error);
    let labels = SinkLabels {
        sink: "webhook:platform".into(),
    };
    // The metrics move just after the commits: wait for them, do not race them.
    until("three dead-lettered in the metrics", || async {
        ev.metrics.relay_dead_lettered.get_or_create(&labels).get() == 3
            && ev.metrics.relay_dead_letters.get_or_create(&labels).get() == 3
    })
    .await;
    assert!(ev.metrics.render().contains(
        "billing_events_dead_lettered_total{service=\"test\",sink=\"webhook:platform\"} 3"
    ));

    // The receiver is fixed; an operator retries the second one.
    receiver.set(Mode::Accept);
    let clock = ServiceClock::test(chrono::DateTime::from_timestamp(1_767_225_600, 0).unwrap());
    let service = EventDeliveryService::new(db.clone(), clock, ["webhook:platform".to_string()]);
    let ask = |key: &str, sink: &str, cursor: u64| {
        tonic::Request::new(RetryDeadLetterRequest {
            idempotency_key: key.into(),
            sink: sink.into(),
            cursor,
        })
    };
    let first = service
        .retry_dead_letter(ask("k1", "webhook:platform", 2))
        .await
        .unwrap();
    let d = first.into_inner().dead_letter.unwrap();
    assert_eq!((d.cursor, d.state.as_str()), (2, "retrying"));
    // A retry of the call answers the same and changes nothing.
    let again = service
        .retry_dead_letter(ask("k1", "webhook:platform", 2))
        .await
        .unwrap();
    assert_eq!(again.into_inner().dead_letter.unwrap(), d);
    let reused = service
        .retry_dead_letter(ask("k1", "webhook:platform", 3))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    let missing = service
        .retry_dead_letter(ask("k2", "webhook:platform", 9))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let unknown = service
        .retry_dead_letter(ask("k3", "webhook:gone", 1))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let no_key = service
        .retry_dead_letter(ask("", "webhook:platform", 1))
        .await
        .unwrap_err();
    assert_eq!(no_key.code(), Code::InvalidArgument);

    until("the retried event delivered", || async {
        receiver.got().len() == 1
    })
    .await;
    assert_eq!(receiver.cursors(), [2]);
    until("marked delivered", || async {
        relay::dead_letters(&db, "webhook:platform", 1, 1)
            .await
            .unwrap()[0]
            .state
            == "delivered"
    })
    .await;
    until("two dead letters left in the gauge", || async {
        ev.metrics.relay_dead_letters.get_or_create(&labels).get() == 2
    })
    .await;
    let done = service
        .retry_dead_letter(ask("k4", "webhook:platform", 2))
        .await
        .unwrap_err();
    assert_eq!(done.code(), Code::FailedPrecondition, "{done:?}");

    let listed = service
        .list_deliveries(tonic::Request::new(ListDeliveriesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.head_cursor, 3);
    assert_eq!(listed.sinks.len(), 1);
    assert_eq!(
        (listed.sinks[0].acked_cursor, listed.sinks[0].configured),
        (3, true)
    );
    let states: Vec<_> = listed
        .dead_letters
        .iter()
        .map(|d| d.state.as_str())
        .collect();
    assert_eq!(states, ["dead", "delivered", "dead"]);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn replicas_sharing_a_database_deliver_each_event_once_and_one_takes_over_from_the_other() {
    let (db, t) = fresh_db().await;
    let ev = Events::new(&db);
    let receiver = Receiver::new(SECRET);
    let addr = receiver.serve().await;
    // A second replica: its own connections to the same database, its own relay.
    let (db2, _) = {
        let migrations = runtime::db::Migrations {
            sqlite: sqlx::migrate::Migrator::DEFAULT,
            postgres: sqlx::migrate::Migrator::DEFAULT,
        };
        let shared: TestDatabase = t.share();
        (
            Db::connect_url(&shared.url, &shared.schema, 4, &migrations)
                .await
                .unwrap(),
            shared,
        )
    };
    let ev2 = Events::new(&db2);
    let (stop1, stop2) = (CancellationToken::new(), CancellationToken::new());
    let r1 = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .spawn(stop1.clone());
    let r2 = ev2
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .spawn(stop2.clone());
    for i in 0..4 {
        ev.append(10, i * 10).await;
    }
    until("40 events", || async { receiver.got().len() >= 40 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.cursors(),
        (1..=40).collect::<Vec<_>>(),
        "each once, in order"
    );

    // Whichever holds the lease stops (and gives it up): the other goes on.
    let owner = relay::sink_state(&db, "webhook:platform")
        .await
        .unwrap()
        .unwrap()
        .lease_owner;
    assert!(owner.is_some());
    stop1.cancel();
    r1.await.unwrap();
    ev2.append(10, 40).await;
    until("50 events", || async { receiver.got().len() >= 50 }).await;
    assert_eq!(receiver.cursors(), (1..=50).collect::<Vec<_>>());
    stop2.cancel();
    r2.await.unwrap();
    db2.close().await;
}

#[tokio::test]
async fn a_relay_killed_mid_delivery_loses_nothing_and_repeats_only_the_same_id() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    let receiver = Receiver::new(SECRET);
    let addr = receiver.serve().await;
    // The receiver takes event 3 but answers only after 5 s: the relay dies meanwhile.
    *receiver.slow.lock().unwrap() = Some((3, Duration::from_secs(5)));
    let lease = Duration::from_millis(600);
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .with_lease(lease)
        .spawn(CancellationToken::new());
    ev.append(6, 0).await;
    until("event 3 in the receiver's hands", || async {
        receiver.cursors().contains(&3)
    })
    .await;
    // Like SIGKILL: no shutdown, no lease release, the acknowledgement never recorded.
    task.abort();
    let _ = task.await;
    assert_eq!(acked(&db, "webhook:platform").await, 2);

    // A new process (its own relay) takes over once the dead one's lease expires.
    let stop = CancellationToken::new();
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .with_lease(lease)
        .spawn(stop.clone());
    until("all six acknowledged", || async {
        acked(&db, "webhook:platform").await == 6
    })
    .await;
    let got = receiver.got();
    assert_eq!(
        got.iter().map(|g| g.cursor).collect::<Vec<_>>(),
        [1, 2, 3, 3, 4, 5, 6],
        "event 3 again (unacknowledged), nothing lost, order kept"
    );
    assert_eq!(got[2].id, got[3].id, "the repeat has the same id");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_restarted_relay_resumes_from_its_stored_cursor() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    let receiver = Receiver::new(SECRET);
    let addr = receiver.serve().await;
    let stop = CancellationToken::new();
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .spawn(stop.clone());
    ev.append(5, 0).await;
    until("five", || async {
        acked(&db, "webhook:platform").await == 5
    })
    .await;
    stop.cancel();
    task.await.unwrap();
    // Written while no relay runs.
    ev.append(5, 5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.got().len(), 5);

    let stop = CancellationToken::new();
    let task = ev
        .relay(webhook("platform", addr, SECRET, &[]), fast_retries())
        .spawn(stop.clone());
    until("ten", || async {
        acked(&db, "webhook:platform").await == 10
    })
    .await;
    assert_eq!(
        receiver.cursors(),
        (1..=10).collect::<Vec<_>>(),
        "none twice, none lost"
    );
    stop.cancel();
    task.await.unwrap();
}

/// The NATS server every test run has (`.ci/run` starts one).
const NATS_URL: &str = "nats://127.0.0.1:4222";

#[tokio::test]
async fn jetstream_gets_each_event_on_its_subject_and_drops_a_republish_by_msg_id() {
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    // A service name of this test alone, so runs sharing the server do not meet.
    let service = format!("svc-{}", uuid::Uuid::new_v4().simple());
    let stream = format!("TEST_{}", uuid::Uuid::new_v4().simple());
    let config = runtime::config::NatsConfig {
        url: NATS_URL.into(),
        stream: stream.clone(),
    };
    let sink = Arc::new(NatsSink::new(&config, &service));
    let stop = CancellationToken::new();
    let task = ev
        .relay(Arc::clone(&sink) as Arc<dyn Sink>, fast_retries())
        .spawn(stop.clone());
    ev.append(4, 0).await;
    until("four published", || async { acked(&db, "nats").await == 4 }).await;

    let client = async_nats::connect(NATS_URL).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut info = js.get_stream(&stream).await.unwrap();
    assert_eq!(info.info().await.unwrap().state.messages, 4);
    let events = relay::read_after(&db, 0, 10).await.unwrap();
    for (seq, event) in (1..).zip(&events) {
        let m = info.get_raw_message(seq).await.unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("billing.{service}.{}", event.event_type)
        );
        assert_eq!(
            m.headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_string()),
            Some(event.event_id.clone())
        );
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["cursor"], event.cursor);
    }
    // A redelivery (as after a crash before the cursor was stored) is dropped by JetStream.
    sink.deliver(&events[0]).await.unwrap();
    sink.deliver(&events[3]).await.unwrap();
    assert_eq!(
        info.info().await.unwrap().state.messages,
        4,
        "deduplicated by Msg-Id"
    );
    ev.append(1, 4).await;
    until("the fifth", || async { acked(&db, "nats").await == 5 }).await;
    assert_eq!(info.info().await.unwrap().state.messages, 5);
    stop.cancel();
    task.await.unwrap();
    js.delete_stream(&stream).await.unwrap();
}

const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "relay-test",
    env_prefix: "RELAYTEST",
    grpc_port: 0,
    metrics_port: 0,
    schema: "relay_test",
    peers: &[],
};

fn spec() -> runtime::ServiceSpec {
    runtime::ServiceSpec {
        defaults: DEFAULTS,
        grpc_services: &[],
        scopes: runtime::auth::MethodScopes::new,
        migrations: || runtime::db::Migrations {
            sqlite: sqlx::migrate::Migrator::DEFAULT,
            postgres: sqlx::migrate::Migrator::DEFAULT,
        },
    }
}

async fn start(t: &TestDatabase, hook: SocketAddr) -> runtime::Running {
    let extra = format!(
        "events_retry_initial_ms = 20\nevents_retry_max_ms = 100\nevents_retry_for_seconds = 3600\n\
         [[webhooks]]\nname = \"platform\"\nurl = \"http://{hook}/hook\"\nsecret = \"{SECRET}\"\n"
    );
    let config = runtime::testing::config_with(&DEFAULTS, t, &extra);
    runtime::server::start(&spec(), config, |_| Ok(tonic::service::Routes::default()))
        .await
        .unwrap()
}

async fn write(running: &runtime::Running, n: usize, from: usize) {
    let p = &running.platform;
    let mut tx = p.db.begin_write().await.unwrap();
    for i in from..from + n {
        outbox::append(&mut tx, "a.one", &format!("s{i}"), &json!({ "i": i }), 1)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    p.outbox.poke();
}

#[tokio::test]
async fn every_service_relays_its_configured_webhooks_serves_event_delivery_and_resumes_after_a_restart()
 {
    let t = TestDatabase::fresh();
    let receiver = Receiver::new(SECRET);
    let hook = receiver.serve().await;
    let running = start(&t, hook).await;
    write(&running, 5, 0).await;
    until("five delivered", || async { receiver.got().len() >= 5 }).await;

    let mut client = EventDeliveryClient::connect(format!("http://{}", running.addr))
        .await
        .unwrap();
    let listed = client
        .list_deliveries(authed(READ_TOKEN, ListDeliveriesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sinks[0].sink, "webhook:platform");
    until("acknowledged", || async {
        acked(&running.platform.db, "webhook:platform").await == 5
    })
    .await;
    let unauthenticated = client
        .list_deliveries(tonic::Request::new(ListDeliveriesRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let read_only = client
        .retry_dead_letter(authed(
            READ_TOKEN,
            RetryDeadLetterRequest {
                idempotency_key: "k".into(),
                sink: "webhook:platform".into(),
                cursor: 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(read_only.code(), Code::PermissionDenied);
    let none = client
        .retry_dead_letter(authed(
            ADMIN_TOKEN,
            RetryDeadLetterRequest {
                idempotency_key: "k".into(),
                sink: "webhook:platform".into(),
                cursor: 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::NotFound);
    // The counter moves just after the acknowledging commit: wait for it, do not race it.
    let metrics_url = format!("http://{}/metrics", running.metrics_addr.unwrap());
    until("5 delivered in /metrics", || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains(
                "billing_events_delivered_total{service=\"relay-test\",sink=\"webhook:platform\"} 5",
            )
    })
    .await;
    running.stop().await.unwrap();

    // Stopped: events written meanwhile by another replica wait in the outbox.
    let lone = {
        let migrations = runtime::db::Migrations {
            sqlite: sqlx::migrate::Migrator::DEFAULT,
            postgres: sqlx::migrate::Migrator::DEFAULT,
        };
        Db::connect_url(&t.url, &t.schema, 2, &migrations)
            .await
            .unwrap()
    };
    let ev = Events::new(&lone);
    ev.append(3, 5).await;
    lone.close().await;
    let running = start(&t, hook).await;
    write(&running, 2, 8).await;
    until("ten delivered", || async {
        acked(&running.platform.db, "webhook:platform").await == 10
    })
    .await;
    let subjects: Vec<String> = receiver
        .got()
        .iter()
        .map(|g| g.body["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        subjects,
        (0..10).map(|i| format!("s{i}")).collect::<Vec<_>>(),
        "after the restart: from the stored cursor, none lost, none twice"
    );
    assert_eq!(receiver.cursors(), (1..=10).collect::<Vec<_>>());
    running.stop().await.unwrap();
}

/// The figure in docs/benchmarks.md ("Events out"): events per second one webhook relay
/// delivers to a local receiver that verifies every signature, from a backlog of 5,000.
/// `cargo test --release -p runtime --test it -- --ignored --nocapture webhook_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn webhook_throughput() {
    const N: usize = 5_000;
    let (db, _t) = fresh_db().await;
    let ev = Events::new(&db);
    let receiver = Receiver::new(SECRET);
    let addr = receiver.serve().await;
    for i in 0..N / 500 {
        ev.append(500, i * 500).await;
    }
    let stop = CancellationToken::new();
    let started = std::time::Instant::now();
    let task = ev
        .relay(webhook("bench", addr, SECRET, &[]), fast_retries())
        .spawn(stop.clone());
    loop {
        if acked(&db, "webhook:bench").await == N as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    task.await.unwrap();
    assert_eq!(receiver.cursors(), (1..=N as i64).collect::<Vec<_>>());
    println!(
        "backend {:?}: {N} events delivered in {took:?}: {} events/s",
        runtime::testing::backend(),
        (N as u128 * 1000) / took.as_millis().max(1)
    );
}
