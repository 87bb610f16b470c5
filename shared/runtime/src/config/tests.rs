use std::path::Path;

use super::*;
use crate::auth::Scope;

const DEFAULTS: ServiceDefaults = ServiceDefaults {
    name: "credits-wallet",
    env_prefix: "WALLET",
    grpc_port: 50051,
    metrics_port: 9101,
    schema: "wallet",
    peers: &[PeerSpec {
        name: "wallet",
        service: "credits-wallet",
        required: true,
    }],
};

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_apply_and_env_overrides_file() {
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "listen_addr = \"127.0.0.1:7000\"\n[[tokens]]\nname = \"ops\"\ntoken = \"secret-ops\"\nscopes = [\"admin\"]\n",
        &env(&[("WALLET_LISTEN_ADDR", "127.0.0.1:7001")]),
    )
    .unwrap();
    assert_eq!(cfg.listen_addr.port(), 7001);
    assert_eq!(cfg.metrics_addr.unwrap().port(), 9101);
    assert_eq!(cfg.database_url, "sqlite://data/credits-wallet.db");
    assert_eq!(cfg.database_schema, "wallet");
    assert_eq!(cfg.tokens[0].scopes, vec![Scope::Admin]);
    assert_eq!(cfg.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
    assert_eq!(cfg.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
    assert_eq!(cfg.max_concurrent_streams, DEFAULT_MAX_CONCURRENT_STREAMS);
    assert_eq!(cfg.group_commit_shards, None);
    let e = env(&[
        ("WALLET_TOKENS", "t:long-secret:read"),
        ("WALLET_GROUP_COMMIT_SHARDS", "2"),
    ]);
    let cfg = ServiceConfig::from_toml(&DEFAULTS, "group_commit_shards = 8", &e).unwrap();
    assert_eq!(cfg.group_commit_shards, Some(2));
}

#[test]
fn tokens_from_env_parse_scopes() {
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[(
            "WALLET_TOKENS",
            "pipeline:s3cret-pipe:read+mutate,ops:s3cret-ops:admin",
        )]),
    )
    .unwrap();
    assert_eq!(cfg.tokens.len(), 2);
    assert_eq!(cfg.tokens[0].scopes, vec![Scope::Read, Scope::Mutate]);
}

#[test]
fn a_token_name_may_contain_colons_in_env_and_file_alike() {
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[(
            "WALLET_TOKENS",
            "partner:acme-agency:s3cret-acme:read+mutate, ops:s3cret-ops:admin",
        )]),
    )
    .unwrap();
    assert_eq!(cfg.tokens[0].name, "partner:acme-agency");
    assert_eq!(cfg.tokens[0].token, "s3cret-acme");
    assert_eq!(cfg.tokens[0].scopes, vec![Scope::Read, Scope::Mutate]);
    assert_eq!(cfg.tokens[1].name, "ops");
    assert_eq!(cfg.tokens[1].token, "s3cret-ops");
    let file = ServiceConfig::from_toml(
        &DEFAULTS,
        "[[tokens]]\nname = \"partner:acme-agency\"\ntoken = \"s3cret:acme,1\"\nscopes = [\"read\"]\n",
        &env(&[]),
    )
    .unwrap();
    assert_eq!(file.tokens[0].name, "partner:acme-agency");
    assert_eq!(file.tokens[0].token, "s3cret:acme,1");
    let err = ServiceConfig::from_toml(&DEFAULTS, "", &env(&[("WALLET_TOKENS", "ops:admin")]))
        .unwrap_err();
    assert!(err.to_string().contains("name:secret:scope"), "{err}");
}

#[test]
fn fallback_settings_apply_only_where_neither_env_nor_file_sets_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wallet.toml");
    std::fs::write(
        &path,
        "listen_addr = \"127.0.0.1:7000\"\n[[tokens]]\nname = \"ops\"\ntoken = \"file-secret\"\nscopes = [\"admin\"]\n[peers.wallet]\nurl = \"http://file:1\"\ntoken = \"file-peer\"\n",
    )
    .unwrap();
    let fallback = env(&[
        ("WALLET_TOKENS", "dev:dev-admin-token:read"),
        ("WALLET_LISTEN_ADDR", "127.0.0.1:7001"),
        ("WALLET_METRICS_ADDR", "off"),
        ("WALLET_PEER_WALLET_URL", "http://fallback:1"),
        ("WALLET_PEER_WALLET_TOKEN", "fallback-peer"),
    ]);
    let from_file = env(&[("WALLET_CONFIG", path.to_str().unwrap())]);
    let cfg = ServiceConfig::load_with_fallback(&DEFAULTS, &from_file, &fallback).unwrap();
    assert_eq!(cfg.tokens.len(), 1);
    assert_eq!(cfg.tokens[0].token, "file-secret");
    assert_eq!(cfg.listen_addr.port(), 7000);
    assert_eq!(
        cfg.metrics_addr, None,
        "not in the file: the fallback applies"
    );
    assert_eq!(cfg.peer("wallet").unwrap().url, "http://file:1");
    assert_eq!(cfg.peer("wallet").unwrap().token, "file-peer");

    let mut from_env = from_file.clone();
    from_env.insert("WALLET_TOKENS".into(), "env:env-secret-1:read".into());
    let cfg = ServiceConfig::load_with_fallback(&DEFAULTS, &from_env, &fallback).unwrap();
    assert_eq!(cfg.tokens[0].token, "env-secret-1");

    let cfg = ServiceConfig::load_with_fallback(&DEFAULTS, &env(&[]), &fallback).unwrap();
    assert_eq!(cfg.tokens[0].token, "dev-admin-token");
    assert_eq!(cfg.listen_addr.port(), 7001);
    let peer = cfg.peer("wallet").unwrap();
    assert_eq!(
        (peer.url.as_str(), peer.token.as_str()),
        ("http://fallback:1", "fallback-peer")
    );
    assert_eq!(
        (peer.name.as_str(), peer.service.as_str()),
        ("wallet", "credits-wallet")
    );
}

#[test]
fn errors_name_the_setting() {
    let cases = [
        ("WALLET_LISTEN_ADDR", "nope", "listen_addr"),
        ("WALLET_DATABASE_URL", "mysql://x", "database_url"),
        (
            "WALLET_IDEMPOTENCY_RETENTION_HOURS",
            "2",
            "idempotency_retention_hours",
        ),
        ("WALLET_CONCURRENCY_LIMIT", "-1", "WALLET_CONCURRENCY_LIMIT"),
        ("WALLET_MAX_REQUEST_BYTES", "1000", "max_request_bytes"),
        (
            "WALLET_MAX_RESPONSE_BYTES",
            "x",
            "WALLET_MAX_RESPONSE_BYTES",
        ),
        (
            "WALLET_MAX_CONCURRENT_STREAMS",
            "0",
            "max_concurrent_streams",
        ),
        (
            "WALLET_TEST_CLOCK_START",
            "2026-02-01T00:00:00Z",
            "test_clock_start",
        ),
        ("WALLET_GROUP_COMMIT_SHARDS", "65", "group_commit_shards"),
        (
            "WALLET_GROUP_COMMIT_SHARDS",
            "-1",
            "WALLET_GROUP_COMMIT_SHARDS",
        ),
        ("WALLET_TLS_CERT_PATH", "/etc/cert.pem", "tls_key_path"),
        ("WALLET_TLS_KEY_PATH", "/etc/key.pem", "tls_cert_path"),
        ("WALLET_TOKENS", "a:short:read", "tokens"),
        ("WALLET_TOKENS", "a:long-enough:fly", "tokens"),
    ];
    for (key, value, named) in cases {
        let mut e = env(&[("WALLET_TOKENS", "t:long-secret:read")]);
        e.insert(key.into(), value.into());
        let err = ServiceConfig::from_toml(&DEFAULTS, "", &e).unwrap_err();
        assert!(err.to_string().contains(named), "{key}={value}: {err}");
    }
}

#[test]
fn no_tokens_is_refused_and_unknown_file_keys_too() {
    let err = ServiceConfig::from_toml(&DEFAULTS, "", &env(&[])).unwrap_err();
    assert!(err.to_string().contains("no bearer tokens"));
    let err = ServiceConfig::from_toml(&DEFAULTS, "lisen_addr = \"x\"", &env(&[])).unwrap_err();
    assert!(err.to_string().contains("lisen_addr"), "{err}");
}

#[test]
fn peers_come_from_the_environment_too() {
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_PEER_WALLET_URL", "http://127.0.0.1:1"),
            ("WALLET_PEER_WALLET_TOKEN", "peer-secret"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.peer("wallet").unwrap().url, "http://127.0.0.1:1");
    let half = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_PEER_WALLET_URL", "http://127.0.0.1:1"),
        ]),
    )
    .unwrap_err();
    assert!(
        half.to_string().contains("WALLET_PEER_WALLET_URL"),
        "{half}"
    );
}

#[test]
fn tls_paths_come_in_pairs_and_https_peers_name_their_ca() {
    let base = [
        ("WALLET_TOKENS", "t:long-secret:read"),
        ("WALLET_PEER_WALLET_URL", "https://wallet:1"),
        ("WALLET_PEER_WALLET_TOKEN", "peer-secret"),
    ];
    let err = ServiceConfig::from_toml(&DEFAULTS, "", &env(&base)).unwrap_err();
    assert!(err.to_string().contains("peers.wallet.ca_path"), "{err}");
    let mut with_ca = env(&base);
    with_ca.insert("WALLET_PEER_WALLET_CA_PATH".into(), "/etc/ca.pem".into());
    with_ca.insert("WALLET_TLS_CERT_PATH".into(), "/etc/cert.pem".into());
    with_ca.insert("WALLET_TLS_KEY_PATH".into(), "/etc/key.pem".into());
    let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &with_ca).unwrap();
    assert_eq!(
        cfg.peer("wallet").unwrap().ca_path.as_deref(),
        Some(Path::new("/etc/ca.pem"))
    );
    let tls = cfg.tls.unwrap();
    assert_eq!(tls.cert_path, Path::new("/etc/cert.pem"));
    assert_eq!(tls.key_path, Path::new("/etc/key.pem"));
    let plain = ServiceConfig::from_toml(&DEFAULTS, "", &env(&base[..1])).unwrap();
    assert!(plain.tls.is_none());
}

#[test]
fn debug_output_redacts_secrets() {
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[("WALLET_TOKENS", "pipeline:very-secret-value:read")]),
    )
    .unwrap();
    assert!(!format!("{cfg:?}").contains("very-secret-value"));
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[
            ("WALLET_TOKENS", "pipeline:very-secret-value:read"),
            (
                "WALLET_DATABASE_URL",
                "postgres://billing:db-pass-4711@db.internal:5432/billing?sslmode=require",
            ),
        ]),
    )
    .unwrap();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("db-pass-4711"), "{shown}");
    assert!(
        shown.contains("postgres://billing:<redacted>@db.internal:5432/billing?sslmode=require"),
        "{shown}"
    );
}

#[test]
fn the_payment_provider_is_the_simulator_unless_stripe_is_configured() {
    let tokens = ("WALLET_TOKENS", "t:long-secret:read");
    let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &env(&[tokens])).unwrap();
    assert_eq!(cfg.payment_provider, PaymentProvider::Simulator);
    assert!(cfg.stripe.is_none());

    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "payment_provider = \"stripe\"\nstripe_secret_key = \"sk_test_file\"\n",
        &env(&[
            tokens,
            ("WALLET_STRIPE_SECRET_KEY", "sk_test_from_env_4711"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.payment_provider, PaymentProvider::Stripe);
    let stripe = cfg.stripe.clone().unwrap();
    assert_eq!(stripe.api_base, "https://api.stripe.com");
    assert_eq!(stripe.secret_key.expose(), "sk_test_from_env_4711");
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("from_env_4711"), "{shown}");
    assert!(
        shown.contains("Stripe") || shown.contains("stripe"),
        "{shown}"
    );

    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("stripe.key");
    std::fs::write(&key_file, "sk_test_in_a_file\n").unwrap();
    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[
            tokens,
            ("WALLET_PAYMENT_PROVIDER", "stripe"),
            ("WALLET_STRIPE_SECRET_KEY_FILE", key_file.to_str().unwrap()),
            ("WALLET_STRIPE_API_BASE", "http://127.0.0.1:8420"),
        ]),
    )
    .unwrap();
    let stripe = cfg.stripe.unwrap();
    assert_eq!(stripe.secret_key.expose(), "sk_test_in_a_file");
    assert_eq!(stripe.api_base, "http://127.0.0.1:8420");
    assert!(stripe.webhook_secret.is_none());

    let cfg = ServiceConfig::from_toml(
        &DEFAULTS,
        "",
        &env(&[
            tokens,
            ("WALLET_PAYMENT_PROVIDER", "stripe"),
            ("WALLET_STRIPE_SECRET_KEY", "sk_test_4711abcd"),
            ("WALLET_STRIPE_WEBHOOK_SECRET", "whsec_hook_4711"),
        ]),
    )
    .unwrap();
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("hook_4711"), "{shown}");
    assert_eq!(
        cfg.stripe.unwrap().webhook_secret.unwrap().expose(),
        "whsec_hook_4711"
    );
}

#[test]
fn stripe_settings_are_checked_and_errors_name_them() {
    let tokens = ("WALLET_TOKENS", "t:long-secret:read");
    let stripe = ("WALLET_PAYMENT_PROVIDER", "stripe");
    let key = ("WALLET_STRIPE_SECRET_KEY", "sk_test_4711abcd");
    for (pairs, setting, needle) in [
        (
            vec![("WALLET_PAYMENT_PROVIDER", "paypal")],
            "payment_provider",
            "simulator or stripe",
        ),
        (
            vec![stripe],
            "stripe_secret_key",
            "WALLET_STRIPE_SECRET_KEY_FILE",
        ),
        (vec![key], "stripe_secret_key", "applies to Stripe only"),
        (
            vec![stripe, ("WALLET_STRIPE_SECRET_KEY", "pk_test_publishable")],
            "stripe_secret_key",
            "sk_",
        ),
        (
            vec![
                stripe,
                key,
                ("WALLET_STRIPE_SECRET_KEY_FILE", "/nonexistent"),
            ],
            "stripe_secret_key",
            "not both",
        ),
        (
            vec![
                stripe,
                ("WALLET_STRIPE_SECRET_KEY_FILE", "/nonexistent/stripe.key"),
            ],
            "stripe_secret_key_file",
            "cannot read",
        ),
        (
            vec![
                stripe,
                key,
                ("WALLET_STRIPE_API_BASE", "http://stripe.example.com"),
            ],
            "stripe_api_base",
            "must be https://",
        ),
        (
            vec![stripe, key, ("WALLET_STRIPE_API_BASE", "not a url")],
            "stripe_api_base",
            "not a URL",
        ),
        (
            vec![
                stripe,
                key,
                ("WALLET_STRIPE_WEBHOOK_SECRET", "sk_test_4711abcd"),
            ],
            "stripe_webhook_secret",
            "whsec_",
        ),
        (
            vec![("WALLET_STRIPE_WEBHOOK_SECRET", "whsec_x")],
            "stripe_webhook_secret",
            "applies to Stripe only",
        ),
    ] {
        let mut pairs = pairs;
        pairs.push(tokens);
        let e = ServiceConfig::from_toml(&DEFAULTS, "", &env(&pairs)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(setting) && text.contains(needle),
            "{pairs:?}: {text}"
        );
        assert!(
            !text.contains("4711abcd") && !text.contains("publishable"),
            "{text}"
        );
    }
}

#[test]
fn redact_url_leaves_out_only_the_password() {
    for (url, shown) in [
        (
            "postgres://u:secret@h:5432/d",
            "postgres://u:<redacted>@h:5432/d",
        ),
        (
            "postgres://u:p%40ss@h/d?x=1",
            "postgres://u:<redacted>@h/d?x=1",
        ),
        ("postgres://u@h/d", "postgres://u@h/d"),
        (
            "postgres://h/d?user=u&password=secret&sslmode=disable",
            "postgres://h/d?user=u&password=<redacted>&sslmode=disable",
        ),
        ("postgres://u:secret@h", "postgres://u:<redacted>@h"),
        ("sqlite://data/wallet.db", "sqlite://data/wallet.db"),
        ("sqlite:data/x.db?mode=rwc", "sqlite:data/x.db?mode=rwc"),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}

// --- issue 19 (events out) ---
#[test]
fn webhooks_come_from_the_file_or_the_environment_and_are_validated() {
    let file = "[[tokens]]\nname = \"ops\"\ntoken = \"secret-ops\"\nscopes = [\"admin\"]\n\
        [[webhooks]]\nname = \"email\"\nurl = \"https://mail.example/hooks\"\n\
        secret = \"whsec_0123456789abcdef\"\nevent_types = [\"wallet.low_balance\"]\n";
    let cfg = ServiceConfig::from_toml(&DEFAULTS, file, &env(&[])).unwrap();
    let w = &cfg.events.webhooks[0];
    assert_eq!(
        (w.name.as_str(), w.url.as_str(), w.event_types.as_slice()),
        (
            "email",
            "https://mail.example/hooks",
            &["wallet.low_balance".to_string()][..]
        )
    );
    assert!(!format!("{cfg:?}").contains("whsec_0123456789abcdef"));
    let nats = ServiceConfig::from_toml(
        &DEFAULTS,
        "nats_url = \"nats://billing:nats-pass-4711@nats:4222\"",
        &env(&[("WALLET_TOKENS", "t:long-secret:read")]),
    )
    .unwrap();
    assert!(!format!("{nats:?}").contains("nats-pass-4711"));
    assert_eq!(cfg.events.retry, RetryPolicy::default());
    assert!(cfg.events.nats.is_none());

    let e = env(&[
        ("WALLET_TOKENS", "t:long-secret:read"),
        ("WALLET_WEBHOOKS", "crm, email-platform"),
        ("WALLET_WEBHOOK_CRM_URL", "http://crm:8080/in"),
        ("WALLET_WEBHOOK_CRM_SECRET", "crm-secret-0123456789"),
        ("WALLET_WEBHOOK_EMAIL_PLATFORM_URL", "http://mail:1/h"),
        (
            "WALLET_WEBHOOK_EMAIL_PLATFORM_SECRET",
            "mail-secret-0123456789",
        ),
        ("WALLET_WEBHOOK_EMAIL_PLATFORM_EVENT_TYPES", "a.b, c.d"),
        ("WALLET_NATS_URL", "nats://127.0.0.1:4222"),
    ]);
    let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &e).unwrap();
    let names: Vec<_> = cfg
        .events
        .webhooks
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["crm", "email-platform"]);
    assert_eq!(cfg.events.webhooks[1].event_types, ["a.b", "c.d"]);
    let nats = cfg.events.nats.unwrap();
    assert_eq!(nats.stream, "BILLING_CREDITS_WALLET");

    let cases = [
        ("WALLET_WEBHOOK_CRM_URL", "ftp://x", "webhooks.crm.url"),
        ("WALLET_WEBHOOK_CRM_SECRET", "short", "webhooks.crm.secret"),
        ("WALLET_WEBHOOK_CRM_URL", "", "WALLET_WEBHOOK_CRM_URL"),
        ("WALLET_NATS_URL", "http://x", "nats_url"),
        ("WALLET_NATS_STREAM", "a.b", "nats_stream"),
        (
            "WALLET_EVENTS_RETRY_FOR_SECONDS",
            "60",
            "events_retry_for_seconds",
        ),
        ("WALLET_EVENTS_RETRY_MAX_MS", "10", "events_retry_max_ms"),
        ("WALLET_EVENTS_LEASE_SECONDS", "5", "events_lease_seconds"),
    ];
    for (key, value, named) in cases {
        let mut e = env(&[
            ("WALLET_TOKENS", "t:long-secret:read"),
            ("WALLET_WEBHOOKS", "crm"),
            ("WALLET_WEBHOOK_CRM_URL", "http://crm:8080/in"),
            ("WALLET_WEBHOOK_CRM_SECRET", "crm-secret-0123456789"),
        ]);
        if value.is_empty() {
            e.remove(key);
        } else {
            e.insert(key.into(), value.into());
        }
        let err = ServiceConfig::from_toml(&DEFAULTS, "", &e).unwrap_err();
        assert!(err.to_string().contains(named), "{key}={value}: {err}");
    }
    // A short retry budget is for tests only.
    let short = env(&[
        ("WALLET_TOKENS", "t:long-secret:read"),
        ("WALLET_TEST_CLOCK", "true"),
        ("WALLET_EVENTS_RETRY_FOR_SECONDS", "1"),
    ]);
    let cfg = ServiceConfig::from_toml(&DEFAULTS, "", &short).unwrap();
    assert_eq!(cfg.events.retry.give_up_after, Duration::from_secs(1));
    let twice = "[[tokens]]\nname = \"o\"\ntoken = \"secret-ops\"\nscopes = [\"admin\"]\n\
        [[webhooks]]\nname = \"a\"\nurl = \"http://h/\"\nsecret = \"0123456789abcdef\"\n\
        [[webhooks]]\nname = \"a\"\nurl = \"http://h/\"\nsecret = \"0123456789abcdef\"\n";
    let err = ServiceConfig::from_toml(&DEFAULTS, twice, &env(&[])).unwrap_err();
    assert!(err.to_string().contains("share"), "{err}");
}
// --- end issue 19 ---
