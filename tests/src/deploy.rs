//! The deployment files under `deploy/` checked against the services' real configuration, with
//! no container engine or cluster: every compose file, Kubernetes manifest, Dockerfile stage and
//! example configuration is parsed, the environment each process would get is assembled
//! (image `ENV`, then ConfigMap or compose values, Secret references replaced by placeholders)
//! and loaded with the services' own loader, `runtime::config::ServiceConfig::load`. Ports,
//! probes, selectors, schemas and peer addresses in the files must agree with what the loader
//! makes of that environment, and a `{PREFIX}_*` variable the loader never reads fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use runtime::{
    auth::Scope,
    config::{Environment, ServiceConfig, ServiceDefaults},
};
use yaml_rust2::{
    Yaml, YamlLoader,
    parser::{Event, Parser},
    scanner::TScalarStyle,
};

/// The three services, by their real defaults.
const SERVICES: [ServiceDefaults; 3] = [
    credits_wallet::DEFAULTS,
    subscription::DEFAULTS,
    reseller_billing::DEFAULTS,
];

/// The settings `runtime::config` reads as `{PREFIX}_{KEY}` (besides `PEER_<NAME>_URL`, `_TOKEN`, `_CA_PATH`).
/// Only a sanity check of the recording below: the loader itself decides what is known.
const SETTINGS: [&str; 19] = [
    "CONFIG",
    "LISTEN_ADDR",
    "METRICS_ADDR",
    "DATABASE_URL",
    "DATABASE_SCHEMA",
    "DATABASE_MAX_CONNECTIONS",
    "LOG_FORMAT",
    "LOG_FILTER",
    "REQUEST_TIMEOUT_MS",
    "CONCURRENCY_LIMIT",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_CONCURRENT_STREAMS",
    "TEST_CLOCK",
    "TEST_CLOCK_START",
    "IDEMPOTENCY_RETENTION_HOURS",
    "TOKENS",
    "TLS_CERT_PATH",
    "TLS_KEY_PATH",
];

/// Kubernetes deployment shape required by issue 6.
const REPLICAS: i64 = 2;
const HPA_MAX: i64 = 10;
const HPA_CPU_PERCENT: i64 = 70;
const MEMORY_LIMIT: &str = "128Mi";
const MEMORY_REQUEST: &str = "64Mi";
const CPU_REQUEST: &str = "100m";

type Env = BTreeMap<String, String>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The service a peer name stands for: peer `wallet` is the service whose prefix is `WALLET`.
fn peer_service(peer: &str) -> ServiceDefaults {
    SERVICES
        .into_iter()
        .find(|d| d.env_prefix.eq_ignore_ascii_case(peer))
        .unwrap_or_else(|| panic!("peer {peer:?} is none of the services"))
}

// ---------------------------------------------------------------------------------------------
// The real loader, and the variables it reads.

/// An environment that remembers every variable the loader asks for.
struct Recording<'a> {
    env: &'a Env,
    asked: RefCell<BTreeSet<String>>,
}

impl Environment for Recording<'_> {
    fn var(&self, name: &str) -> Option<String> {
        self.asked.borrow_mut().insert(name.to_string());
        self.env.get(name).cloned()
    }
}

/// Loads `env` as service `d` with the real loader. Fails if the loader refuses it, if a
/// `{PREFIX}_*` variable is one the loader never reads (a typo or a setting that does not
/// exist), if another service's variables are set, or if a value is empty (the process would
/// see it as unset).
fn load(what: &str, d: &ServiceDefaults, env: &Env) -> ServiceConfig {
    let recording = Recording {
        env,
        asked: RefCell::new(BTreeSet::new()),
    };
    let config = ServiceConfig::load(d, &recording)
        .unwrap_or_else(|e| panic!("{what}: {} refuses this environment: {e}", d.name));
    let asked = recording.asked.into_inner();
    let prefix = format!("{}_", d.env_prefix);
    let unknown: Vec<&String> = env
        .keys()
        .filter(|k| k.starts_with(&prefix) && !asked.contains(*k))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what}: {unknown:?} are not settings of {} (it reads {asked:?})",
        d.name
    );
    for other in SERVICES.iter().filter(|o| o.name != d.name) {
        let theirs = format!("{}_", other.env_prefix);
        let misplaced: Vec<&String> = env.keys().filter(|k| k.starts_with(&theirs)).collect();
        assert!(
            misplaced.is_empty(),
            "{what}: {misplaced:?} belong to {}, not {}",
            other.name,
            d.name
        );
    }
    for (k, v) in env {
        assert!(
            !v.is_empty(),
            "{what}: {k} is empty (the process reads it as unset)"
        );
    }
    assert!(
        !env.contains_key(&format!("{prefix}CONFIG")),
        "{what}: {prefix}CONFIG names a file the image does not contain"
    );
    config
}

/// Settings that are secrets: never a literal in a manifest, always a Secret (or `.env`).
fn is_secret_setting(d: &ServiceDefaults, var: &str) -> bool {
    let Some(key) = var.strip_prefix(&format!("{}_", d.env_prefix)) else {
        return false;
    };
    key == "TOKENS"
        || key == "DATABASE_URL"
        || (key.starts_with("PEER_") && key.ends_with("_TOKEN"))
}

/// What the test puts in place of a Secret's value.
fn secret_placeholder(d: &ServiceDefaults, var: &str) -> String {
    let key = var
        .strip_prefix(&format!("{}_", d.env_prefix))
        .unwrap_or(var);
    if key == "TOKENS" {
        "placeholder:placeholder-secret-value:read+mutate".into()
    } else if key == "DATABASE_URL" {
        "postgres://billing@postgres.placeholder:5432/billing".into()
    } else if key.starts_with("PEER_") && key.ends_with("_TOKEN") {
        "placeholder-peer-token".into()
    } else {
        panic!(
            "{var} comes from a Secret but is not a secret setting of {}",
            d.name
        )
    }
}

/// `http://host:port` -> (host, port).
fn host_port(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or_else(|| panic!("{url:?} is not an http(s) URL"));
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url:?} has no explicit port"));
    let port = port.parse().unwrap_or_else(|_| panic!("{url:?}: bad port"));
    (host.to_string(), port)
}

/// Checks shared by every place a service is deployed, on the loaded configuration.
fn check_loaded(what: &str, d: &ServiceDefaults, config: &ServiceConfig) {
    assert!(
        config.listen_addr.ip().is_unspecified(),
        "{what}: listen_addr {} is unreachable from outside the container; use 0.0.0.0",
        config.listen_addr
    );
    let metrics = config
        .metrics_addr
        .unwrap_or_else(|| panic!("{what}: metrics are off"));
    assert!(
        metrics.ip().is_unspecified(),
        "{what}: metrics_addr {metrics} is unreachable from outside the container"
    );
    assert_eq!(
        config.database_schema, d.schema,
        "{what}: database schema differs from the service's own"
    );
    assert!(
        config.database_url.starts_with("postgres"),
        "{what}: deployments use PostgreSQL, not {:?}",
        config.database_url
    );
    for peer in d.peers.iter().map(|p| p.name) {
        config
            .peer(peer)
            .unwrap_or_else(|e| panic!("{what}: the {peer} peer is missing: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// YAML.

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    check_yaml_1_1_traps(path, &text);
    let docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Kubernetes and Compose read YAML 1.1, this parser 1.2: plain `on`/`off`/`yes`/`no`/`y`/`n`
/// are booleans there and `9101:9101` is a base-60 number. Such scalars must be quoted. Anchors
/// and aliases are refused too (this parser does not resolve them).
fn check_yaml_1_1_traps(path: &Path, text: &str) {
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser
            .next_token()
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        match event {
            Event::StreamEnd => break,
            Event::Alias(_) => panic!(
                "{}:{}: aliases are not allowed",
                path.display(),
                mark.line()
            ),
            Event::Scalar(v, TScalarStyle::Plain, _, _) => {
                let boolean_1_1 = [
                    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON",
                    "off", "Off", "OFF",
                ]
                .contains(&v.as_str());
                let sexagesimal = v.contains(':')
                    && v.chars().all(|c| c.is_ascii_digit() || c == ':')
                    && !v.starts_with(':');
                assert!(
                    !boolean_1_1 && !sexagesimal,
                    "{}:{}: quote {v:?}: YAML 1.1 readers do not take it as a string",
                    path.display(),
                    mark.line()
                );
            }
            _ => {}
        }
    }
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {y:?}"))
}

fn int_of(y: &Yaml, what: &str) -> i64 {
    y.as_i64()
        .unwrap_or_else(|| panic!("{what}: expected an integer, found {y:?}"))
}

fn seq_of<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what}: expected a list, found {y:?}"))
}

/// A mapping whose values must all be strings (env, labels, ConfigMap data).
fn string_map(y: &Yaml, what: &str) -> Env {
    let h = y
        .as_hash()
        .unwrap_or_else(|| panic!("{what}: expected a mapping, found {y:?}"));
    h.iter()
        .map(|(k, v)| {
            let k = str_of(k, what).to_string();
            let v = str_of(v, &format!("{what}.{k}")).to_string();
            (k, v)
        })
        .collect()
}

fn is_subset(small: &Env, big: &Env) -> bool {
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile.

#[derive(Debug, Clone, Default)]
struct Stage {
    name: String,
    /// The image or stage this one starts from, after `ARG` substitution.
    from: String,
    /// The external image at the root of the stage chain.
    root_image: String,
    env: Env,
    expose: BTreeSet<u16>,
    user: Option<String>,
    stop_signal: Option<String>,
    copies: Vec<String>,
    runs: Vec<String>,
    entrypoint: Option<String>,
}

fn dockerfile_path() -> PathBuf {
    deploy().join("docker/Dockerfile")
}

/// Parses the instructions this Dockerfile uses; later stages inherit from earlier ones.
fn dockerfile() -> BTreeMap<String, Stage> {
    let text = read(&dockerfile_path());
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    let mut args = Env::new();
    let mut stages: BTreeMap<String, Stage> = BTreeMap::new();
    let mut stage: Option<Stage> = None;
    let subst = |s: &str, args: &Env| {
        let mut out = s.to_string();
        for (k, v) in args {
            out = out
                .replace(&format!("${{{k}}}"), v)
                .replace(&format!("${k}"), v);
        }
        out
    };
    for line in lines {
        let (instr, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let rest = rest.trim();
        match instr.to_ascii_uppercase().as_str() {
            "ARG" if stage.is_none() => {
                if let Some((k, v)) = rest.split_once('=') {
                    args.insert(k.to_string(), v.to_string());
                }
            }
            "FROM" => {
                if let Some(done) = stage.take() {
                    stages.insert(done.name.clone(), done);
                }
                let words: Vec<&str> = rest.split_whitespace().collect();
                let from = subst(words.first().copied().unwrap_or_default(), &args);
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => (*name).to_string(),
                    _ => String::new(),
                };
                let mut next = match stages.get(&from) {
                    Some(parent) => Stage {
                        copies: Vec::new(),
                        runs: Vec::new(),
                        ..parent.clone()
                    },
                    None => Stage {
                        root_image: from.clone(),
                        ..Stage::default()
                    },
                };
                next.name = name;
                next.from = from;
                stage = Some(next);
            }
            other => {
                let s = stage
                    .as_mut()
                    .unwrap_or_else(|| panic!("Dockerfile: {other} before FROM"));
                match other {
                    "ENV" => {
                        for pair in rest.split_whitespace() {
                            let (k, v) = pair
                                .split_once('=')
                                .unwrap_or_else(|| panic!("Dockerfile: use ENV KEY=VALUE: {rest}"));
                            s.env.insert(k.to_string(), v.trim_matches('"').to_string());
                        }
                    }
                    "EXPOSE" => {
                        for p in rest.split_whitespace() {
                            let p = p.trim_end_matches("/tcp");
                            s.expose.insert(
                                p.parse()
                                    .unwrap_or_else(|_| panic!("Dockerfile: EXPOSE {p}")),
                            );
                        }
                    }
                    "USER" => s.user = Some(rest.to_string()),
                    "STOPSIGNAL" => s.stop_signal = Some(rest.to_string()),
                    "COPY" => s.copies.push(rest.to_string()),
                    "RUN" => s.runs.push(rest.to_string()),
                    "ENTRYPOINT" => s.entrypoint = Some(rest.to_string()),
                    _ => {}
                }
            }
        }
    }
    if let Some(done) = stage.take() {
        stages.insert(done.name.clone(), done);
    }
    stages
}

/// The environment the image itself gives the service's process.
fn image_env(name: &str) -> Env {
    dockerfile()
        .remove(name)
        .unwrap_or_else(|| panic!("Dockerfile: no stage named {name}"))
        .env
}

/// `major.minor[.patch]` as numbers, for comparing Rust versions.
fn version(v: &str) -> Vec<u32> {
    v.split('.').map_while(|p| p.parse().ok()).collect()
}

#[test]
fn dockerfile_builds_each_service_into_a_small_non_root_image() {
    let stages = dockerfile();
    let workspace = read(&repo().join("Cargo.toml"));
    let msrv = workspace
        .lines()
        .find_map(|l| l.trim().strip_prefix("rust-version"))
        .map(|v| v.trim_matches(|c: char| c == ' ' || c == '=' || c == '"'))
        .expect("the workspace declares rust-version");
    let builders: Vec<&Stage> = stages
        .values()
        .filter(|s| s.runs.iter().any(|r| r.contains("cargo build")))
        .collect();
    assert_eq!(builders.len(), 1, "Dockerfile: one builder stage");
    let builder = builders[0];
    let rust = builder.root_image.strip_prefix("rust:").unwrap_or_else(|| {
        panic!(
            "builder is not the official Rust image: {}",
            builder.root_image
        )
    });
    assert!(
        version(rust) >= version(msrv),
        "builder Rust {rust} is older than the workspace's rust-version {msrv}"
    );
    let build = builder.runs.join(" ");
    for flag in ["--release", "--locked", "-p \"${SERVICE}\""] {
        assert!(build.contains(flag), "builder: cargo build lacks {flag}");
    }

    for d in SERVICES {
        let what = format!("Dockerfile stage {}", d.name);
        let s = stages
            .get(d.name)
            .unwrap_or_else(|| panic!("{what}: missing (build with --target {})", d.name));
        assert!(
            s.root_image.starts_with("gcr.io/distroless/cc")
                || (s.root_image.starts_with("debian:") && s.root_image.contains("slim")),
            "{what}: the final image should be distroless cc or debian-slim, not {}",
            s.root_image
        );
        let user = s
            .user
            .as_deref()
            .unwrap_or_else(|| panic!("{what}: no USER"));
        let uid: u32 = user
            .split(':')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{what}: USER {user} must be numeric (runAsNonRoot)"));
        assert_ne!(uid, 0, "{what}: runs as root");
        assert_eq!(
            s.stop_signal.as_deref(),
            Some("SIGTERM"),
            "{what}: STOPSIGNAL"
        );
        let binary = format!("/out/{}", d.name);
        assert!(
            s.copies
                .iter()
                .any(|c| c.contains(&format!("--from={}", builder.name)) && c.contains(&binary)),
            "{what}: must copy only {binary} from the builder"
        );
        assert!(
            s.entrypoint.as_deref().is_some_and(|e| e.contains(d.name)),
            "{what}: ENTRYPOINT is not the {} binary",
            d.name
        );
        let mut env = s.env.clone();
        env.insert(
            format!("{}_TOKENS", d.env_prefix),
            secret_placeholder(&d, &format!("{}_TOKENS", d.env_prefix)),
        );
        let config = load(&what, &d, &env);
        let metrics = config.metrics_addr.expect("metrics on").port();
        assert_eq!(
            s.expose,
            BTreeSet::from([config.listen_addr.port(), metrics]),
            "{what}: EXPOSE differs from the gRPC and metrics ports its ENV gives the service"
        );
        assert!(
            config.listen_addr.ip().is_unspecified(),
            "{what}: listen on 0.0.0.0"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Compose.

/// `${VAR}`, `${VAR:?err}`, `${VAR?err}`, `${VAR:-default}`, `${VAR-default}` and `$$`, with
/// variables from `deploy/.env.example`; an undefined variable without default fails.
fn interpolate(value: &str, vars: &Env, what: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let body_end = rest
            .strip_prefix('{')
            .and_then(|r| r.find('}'))
            .unwrap_or_else(|| panic!("{what}: write variables as ${{NAME}} in {value:?}"));
        let body = &rest[1..=body_end];
        rest = &rest[body_end + 2..];
        let name_end = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let (name, modifier) = body.split_at(name_end);
        let default = modifier
            .strip_prefix(":-")
            .or_else(|| modifier.strip_prefix('-'));
        match (vars.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(default)) => out.push_str(default),
            (None, None) => panic!("{what}: ${{{name}}} is not defined in deploy/.env.example"),
        }
    }
    out.push_str(rest);
    out
}

fn env_example() -> Env {
    read(&deploy().join(".env.example"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!(".env.example: {l:?} is not NAME=value"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// Every compose file under deploy/ (`compose.yaml`, `compose.*.yaml`, `docker-compose*`).
fn compose_files() -> Vec<PathBuf> {
    yaml_files(&deploy())
        .into_iter()
        .filter(|p| is_compose(p))
        .collect()
}

fn is_compose(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.starts_with("compose") || name.starts_with("docker-compose")
}

fn seconds(duration: &str, what: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{what}: write the duration in seconds, like 20s"))
}

#[test]
fn compose_runs_the_three_services_on_postgres() {
    let files = compose_files();
    assert!(!files.is_empty(), "no compose file under deploy/");
    let vars = env_example();
    for path in files {
        let file = path.display().to_string();
        let docs = yaml_docs(&path);
        assert_eq!(docs.len(), 1, "{file}: one document");
        let services = docs[0]["services"]
            .as_hash()
            .unwrap_or_else(|| panic!("{file}: no services"));
        let names: BTreeMap<String, &Yaml> = services
            .iter()
            .map(|(k, v)| (str_of(k, &file).to_string(), v))
            .collect();
        let postgres: Vec<&String> = names
            .iter()
            .filter(|(_, s)| {
                s["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("postgres:"))
            })
            .map(|(n, _)| n)
            .collect();
        assert_eq!(postgres.len(), 1, "{file}: one PostgreSQL service");
        let postgres = postgres[0].clone();
        let pg = names[&postgres];
        assert!(
            !pg["healthcheck"]["test"].is_badvalue(),
            "{file}: {postgres} needs a healthcheck (the services wait for it)"
        );
        let pg_env: Env = string_map(&pg["environment"], &format!("{file}: {postgres}"))
            .into_iter()
            .map(|(k, v)| {
                let v = interpolate(&v, &vars, &file);
                (k, v)
            })
            .collect();
        let expected: BTreeSet<&str> = SERVICES
            .iter()
            .map(|d| d.name)
            .chain([postgres.as_str()])
            .collect();
        assert_eq!(
            names.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            expected,
            "{file}: services"
        );

        let mut loaded: BTreeMap<&str, ServiceConfig> = BTreeMap::new();
        for d in SERVICES {
            let what = format!("{file}: {}", d.name);
            let s = names[d.name];
            // The image.
            let image = str_of(&s["image"], &what);
            let repo_name = image.split(':').next().unwrap_or_default();
            assert!(
                repo_name.rsplit('/').next() == Some(d.name),
                "{what}: image {image} is not named after the service"
            );
            let build = &s["build"];
            let context = path
                .parent()
                .expect("compose file in a directory")
                .join(str_of(&build["context"], &what));
            let dockerfile = context.join(str_of(&build["dockerfile"], &what));
            assert_eq!(
                fs::canonicalize(&dockerfile).ok(),
                fs::canonicalize(dockerfile_path()).ok(),
                "{what}: build.dockerfile is not deploy/docker/Dockerfile"
            );
            assert_eq!(
                str_of(&build["target"], &what),
                d.name,
                "{what}: build.target"
            );
            assert_eq!(
                str_of(&build["args"]["SERVICE"], &what),
                d.name,
                "{what}: build.args.SERVICE"
            );
            // The environment: the image's ENV, then compose's.
            let raw = string_map(&s["environment"], &format!("{what}: environment"));
            let mut env = image_env(d.name);
            for (k, v) in &raw {
                if is_secret_setting(&d, k) {
                    assert!(
                        v.contains("${"),
                        "{what}: {k} is a secret: take it from deploy/.env, not the file"
                    );
                }
                env.insert(k.clone(), interpolate(v, &vars, &what));
            }
            let config = load(&what, &d, &env);
            check_loaded(&what, &d, &config);
            // The database is the compose PostgreSQL.
            let url = &config.database_url;
            let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
            let (userinfo, hostpath) = after_scheme
                .rsplit_once('@')
                .unwrap_or_else(|| panic!("{what}: database URL has no user"));
            let host = hostpath.split([':', '/']).next().unwrap_or_default();
            let db = hostpath.rsplit('/').next().unwrap_or_default();
            assert_eq!(
                host, postgres,
                "{what}: database host is not the {postgres} service"
            );
            assert_eq!(
                Some(&db.to_string()),
                pg_env.get("POSTGRES_DB"),
                "{what}: database name"
            );
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            assert_eq!(
                Some(&user.to_string()),
                pg_env.get("POSTGRES_USER"),
                "{what}: database user"
            );
            assert_eq!(
                Some(&password.to_string()),
                pg_env.get("POSTGRES_PASSWORD"),
                "{what}: database password"
            );
            // Published ports are the service's ports.
            let published: BTreeSet<u16> = seq_of(&s["ports"], &what)
                .iter()
                .map(|p| {
                    let p = str_of(p, &what);
                    p.trim_end_matches("/tcp")
                        .rsplit(':')
                        .next()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or_else(|| panic!("{what}: port {p:?}"))
                })
                .collect();
            let metrics = config.metrics_addr.expect("checked").port();
            assert_eq!(
                published,
                BTreeSet::from([config.listen_addr.port(), metrics]),
                "{what}: published container ports differ from the gRPC and metrics ports"
            );
            // Start order, shutdown, hardening.
            assert_eq!(
                s["depends_on"][postgres.as_str()]["condition"].as_str(),
                Some("service_healthy"),
                "{what}: must wait for a healthy {postgres}"
            );
            for peer in d.peers.iter().map(|p| p.name) {
                let target = peer_service(peer);
                assert!(
                    !s["depends_on"][target.name].is_badvalue(),
                    "{what}: must depend on {}",
                    target.name
                );
            }
            let grace = seconds(str_of(&s["stop_grace_period"], &what), &what);
            assert!(
                grace > config.request_timeout.as_secs(),
                "{what}: stop_grace_period {grace}s does not cover the {:?} drain",
                config.request_timeout
            );
            assert_eq!(
                s["stop_signal"].as_str(),
                Some("SIGTERM"),
                "{what}: stop_signal"
            );
            assert_eq!(s["read_only"].as_bool(), Some(true), "{what}: read_only");
            assert!(
                !s["restart"].is_badvalue(),
                "{what}: without a healthcheck, a restart policy must retry a failed start"
            );
            loaded.insert(d.name, config);
        }
        // Peers: the wallet's compose name and port, and a token the wallet accepts.
        for d in SERVICES {
            let what = format!("{file}: {}", d.name);
            for peer in d.peers.iter().map(|p| p.name) {
                let target = peer_service(peer);
                let peer_config = loaded[d.name].peer(peer).expect("checked");
                let (host, port) = host_port(&peer_config.url);
                assert_eq!(host, target.name, "{what}: {peer} peer host");
                assert_eq!(
                    port,
                    loaded[target.name].listen_addr.port(),
                    "{what}: {peer} peer port is not {}'s gRPC port",
                    target.name
                );
                let token = loaded[target.name]
                    .tokens
                    .iter()
                    .find(|t| t.token == peer_config.token)
                    .unwrap_or_else(|| {
                        panic!(
                            "{what}: its {peer} token is not one of {}'s tokens",
                            target.name
                        )
                    });
                assert!(
                    token.scopes.contains(&Scope::Read) && token.scopes.contains(&Scope::Mutate),
                    "{what}: token {:?} at {} needs read+mutate",
                    token.name,
                    target.name
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes.

/// The manifests of one service, by kind.
struct K8s {
    dir: PathBuf,
    docs: Vec<(String, Yaml)>,
}

impl K8s {
    fn one(&self, kind: &str) -> &Yaml {
        let found: Vec<&Yaml> = self
            .docs
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, d)| d)
            .collect();
        assert_eq!(found.len(), 1, "{}: one {kind}", self.dir.display());
        found[0]
    }
}

fn k8s_services() -> BTreeMap<String, K8s> {
    let root = deploy().join("k8s");
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display())) {
        let dir = entry.expect("dir entry").path();
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        assert!(
            dir.is_dir() && SERVICES.iter().any(|d| d.name == name),
            "{}: deploy/k8s holds one directory per service",
            dir.display()
        );
        let mut docs = Vec::new();
        for file in yaml_files(&dir) {
            for doc in yaml_docs(&file) {
                let kind = str_of(&doc["kind"], &file.display().to_string()).to_string();
                assert_ne!(
                    kind,
                    "Secret",
                    "{}: Secrets are created by the operator, never committed",
                    file.display()
                );
                docs.push((kind, doc));
            }
        }
        out.insert(name, K8s { dir, docs });
    }
    for d in SERVICES {
        assert!(out.contains_key(d.name), "deploy/k8s/{} is missing", d.name);
    }
    out
}

fn labels(y: &Yaml, what: &str) -> Env {
    string_map(y, what)
}

fn container_port(container: &Yaml, name: &str, what: &str) -> i64 {
    seq_of(&container["ports"], what)
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .map(|p| int_of(&p["containerPort"], what))
        .unwrap_or_else(|| panic!("{what}: no container port named {name}"))
}

/// The Service port `port` forwards to, resolved to a container port number.
fn target_port(service_port: &Yaml, container: &Yaml, what: &str) -> i64 {
    match &service_port["targetPort"] {
        Yaml::Integer(n) => *n,
        Yaml::String(name) => container_port(container, name, what),
        Yaml::BadValue => int_of(&service_port["port"], what),
        other => panic!("{what}: targetPort {other:?}"),
    }
}

#[test]
fn kubernetes_manifests_match_the_services_configuration() {
    let all = k8s_services();
    let mut grpc_service_ports: BTreeMap<&str, (String, i64)> = BTreeMap::new();
    let mut peers: Vec<(String, &str, String)> = Vec::new();

    for d in SERVICES {
        let k = &all[d.name];
        let what = format!("deploy/k8s/{}", d.name);

        // Kustomization: lists every manifest of the directory.
        let kustomization = k.one("Kustomization");
        let listed: BTreeSet<String> = seq_of(&kustomization["resources"], &what)
            .iter()
            .map(|r| str_of(r, &what).to_string())
            .collect();
        let present: BTreeSet<String> = yaml_files(&k.dir)
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(String::from))
            .filter(|n| !n.starts_with("kustomization"))
            .collect();
        assert_eq!(listed, present, "{what}: kustomization resources");

        // Deployment.
        let dep = k.one("Deployment");
        let dep_name = str_of(&dep["metadata"]["name"], &what);
        let spec = &dep["spec"];
        assert_eq!(
            int_of(&spec["replicas"], &what),
            REPLICAS,
            "{what}: replicas"
        );
        let pod_labels = labels(&spec["template"]["metadata"]["labels"], &what);
        assert!(
            is_subset(
                &labels(&spec["selector"]["matchLabels"], &what),
                &pod_labels
            ),
            "{what}: the Deployment's selector does not match its pods"
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(
            pod["enableServiceLinks"].as_bool(),
            Some(false),
            "{what}: service links inject *_PORT variables into the services' prefixes"
        );
        let containers = seq_of(&pod["containers"], &what);
        assert_eq!(containers.len(), 1, "{what}: one container");
        let c = &containers[0];
        let image = str_of(&c["image"], &what);
        let image_repo = image.split(['@', ':']).next().unwrap_or_default();
        assert_eq!(
            image_repo.rsplit('/').next(),
            Some(d.name),
            "{what}: image {image} is not the {} image",
            d.name
        );

        // The process environment: image ENV, then envFrom ConfigMaps, then env.
        let mut env = image_env(d.name);
        let configmaps: BTreeMap<String, Env> = k
            .docs
            .iter()
            .filter(|(kind, _)| kind == "ConfigMap")
            .map(|(_, cm)| {
                let name = str_of(&cm["metadata"]["name"], &what).to_string();
                let data = string_map(&cm["data"], &format!("{what}: ConfigMap {name} data"));
                (name, data)
            })
            .collect();
        for from in c["envFrom"].as_vec().map(Vec::as_slice).unwrap_or_default() {
            let name = str_of(&from["configMapRef"]["name"], &format!("{what}: envFrom"));
            let data = configmaps
                .get(name)
                .unwrap_or_else(|| panic!("{what}: envFrom names ConfigMap {name}, not in {what}"));
            for (k, v) in data {
                assert!(
                    !is_secret_setting(&d, k),
                    "{what}: {k} is a secret: reference a Secret, not a ConfigMap"
                );
                env.insert(k.clone(), v.clone());
            }
        }
        let mut from_secrets = BTreeSet::new();
        for e in c["env"].as_vec().map(Vec::as_slice).unwrap_or_default() {
            let name = str_of(&e["name"], &format!("{what}: env")).to_string();
            let value = if let Some(v) = e["value"].as_str() {
                assert!(
                    !is_secret_setting(&d, &name),
                    "{what}: {name} is a secret: reference a Secret instead of a value"
                );
                v.to_string()
            } else if !e["valueFrom"]["secretKeyRef"]["name"].is_badvalue() {
                str_of(&e["valueFrom"]["secretKeyRef"]["key"], &what);
                from_secrets.insert(name.clone());
                secret_placeholder(&d, &name)
            } else if !e["valueFrom"]["configMapKeyRef"]["name"].is_badvalue() {
                let cm = str_of(&e["valueFrom"]["configMapKeyRef"]["name"], &what);
                let key = str_of(&e["valueFrom"]["configMapKeyRef"]["key"], &what);
                configmaps
                    .get(cm)
                    .and_then(|data| data.get(key))
                    .cloned()
                    .unwrap_or_else(|| panic!("{what}: {name}: no key {key} in ConfigMap {cm}"))
            } else {
                panic!(
                    "{what}: env {name}: only value, secretKeyRef and configMapKeyRef are understood"
                )
            };
            env.insert(name, value);
        }
        let mut must_be_secret = vec![
            format!("{}_TOKENS", d.env_prefix),
            format!("{}_DATABASE_URL", d.env_prefix),
        ];
        for peer in d.peers.iter().map(|p| p.name) {
            must_be_secret.push(format!(
                "{}_PEER_{}_TOKEN",
                d.env_prefix,
                peer.to_uppercase()
            ));
        }
        for var in &must_be_secret {
            assert!(
                from_secrets.contains(var),
                "{what}: {var} must come from a Secret"
            );
        }
        let config = load(&what, &d, &env);
        check_loaded(&what, &d, &config);
        let grpc = i64::from(config.listen_addr.port());
        let metrics = i64::from(config.metrics_addr.expect("checked").port());

        // Ports and probes.
        assert_eq!(
            container_port(c, "grpc", &what),
            grpc,
            "{what}: grpc containerPort"
        );
        assert_eq!(
            container_port(c, "metrics", &what),
            metrics,
            "{what}: metrics containerPort"
        );
        assert_eq!(
            seq_of(&c["ports"], &what).len(),
            2,
            "{what}: two container ports"
        );
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let p = &c[probe];
            if p.is_badvalue() && probe == "startupProbe" {
                continue;
            }
            for other in ["httpGet", "tcpSocket", "exec"] {
                assert!(
                    p[other].is_badvalue(),
                    "{what}: {probe} must be a grpc probe"
                );
            }
            assert_eq!(
                int_of(&p["grpc"]["port"], &format!("{what}: {probe}.grpc.port")),
                grpc,
                "{what}: {probe} is not on the gRPC port"
            );
            assert_eq!(
                p["grpc"]["service"].as_str(),
                Some(""),
                "{what}: {probe} must ask for the overall health (service: \"\")"
            );
        }

        // Shutdown: endpoints removed during preStop, then NOT_SERVING and the drain.
        let pre_stop = int_of(
            &c["lifecycle"]["preStop"]["sleep"]["seconds"],
            &format!("{what}: preStop sleep"),
        );
        assert!(pre_stop >= 1, "{what}: preStop sleep");
        let grace = int_of(&pod["terminationGracePeriodSeconds"], &what);
        let drain = i64::try_from(config.request_timeout.as_secs()).expect("small");
        assert!(
            grace > pre_stop + drain,
            "{what}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain {drain} s"
        );

        // Resources and security.
        let r = &c["resources"];
        assert_eq!(
            r["limits"]["memory"].as_str(),
            Some(MEMORY_LIMIT),
            "{what}: memory limit"
        );
        assert_eq!(
            r["requests"]["memory"].as_str(),
            Some(MEMORY_REQUEST),
            "{what}: memory request"
        );
        assert_eq!(
            r["requests"]["cpu"].as_str(),
            Some(CPU_REQUEST),
            "{what}: cpu request"
        );
        let sc = &c["securityContext"];
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{what}: read-only root"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        assert!(
            sc["runAsNonRoot"].as_bool() == Some(true)
                || pod["securityContext"]["runAsNonRoot"].as_bool() == Some(true),
            "{what}: runAsNonRoot"
        );

        // Service: both ports, forwarded to the right container ports, scraped by Prometheus.
        let svc = k.one("Service");
        let svc_name = str_of(&svc["metadata"]["name"], &what).to_string();
        assert!(
            is_subset(&labels(&svc["spec"]["selector"], &what), &pod_labels),
            "{what}: the Service's selector does not match the pods"
        );
        let mut forwarded = BTreeMap::new();
        for p in seq_of(&svc["spec"]["ports"], &what) {
            forwarded.insert(target_port(p, c, &what), int_of(&p["port"], &what));
        }
        assert_eq!(
            forwarded.keys().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([grpc, metrics]),
            "{what}: the Service must forward exactly the gRPC and metrics ports"
        );
        let annotations = labels(&svc["metadata"]["annotations"], &what);
        assert_eq!(
            annotations.get("prometheus.io/scrape").map(String::as_str),
            Some("true"),
            "{what}: prometheus.io/scrape"
        );
        assert_eq!(
            annotations.get("prometheus.io/port"),
            Some(&forwarded[&metrics].to_string()),
            "{what}: prometheus.io/port is not the metrics port"
        );
        assert_eq!(
            annotations.get("prometheus.io/path").map(String::as_str),
            Some("/metrics"),
            "{what}: prometheus.io/path"
        );
        grpc_service_ports.insert(d.name, (svc_name, forwarded[&grpc]));

        // PodDisruptionBudget and HorizontalPodAutoscaler.
        let pdb = k.one("PodDisruptionBudget");
        assert_eq!(
            str_of(&pdb["apiVersion"], &what),
            "policy/v1",
            "{what}: PDB apiVersion"
        );
        assert_eq!(
            int_of(&pdb["spec"]["minAvailable"], &what),
            1,
            "{what}: PDB minAvailable"
        );
        assert!(
            is_subset(
                &labels(&pdb["spec"]["selector"]["matchLabels"], &what),
                &pod_labels
            ),
            "{what}: the PDB's selector does not match the Deployment's pods"
        );
        let hpa = k.one("HorizontalPodAutoscaler");
        assert_eq!(
            str_of(&hpa["apiVersion"], &what),
            "autoscaling/v2",
            "{what}: HPA apiVersion"
        );
        let target = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(
            target["kind"].as_str(),
            Some("Deployment"),
            "{what}: HPA target kind"
        );
        assert_eq!(
            target["apiVersion"].as_str(),
            Some("apps/v1"),
            "{what}: HPA target apiVersion"
        );
        assert_eq!(
            target["name"].as_str(),
            Some(dep_name),
            "{what}: HPA targets another Deployment"
        );
        assert_eq!(
            int_of(&hpa["spec"]["minReplicas"], &what),
            REPLICAS,
            "{what}: HPA min"
        );
        assert_eq!(
            int_of(&hpa["spec"]["maxReplicas"], &what),
            HPA_MAX,
            "{what}: HPA max"
        );
        let cpu = seq_of(&hpa["spec"]["metrics"], &what)
            .iter()
            .find(|m| m["resource"]["name"].as_str() == Some("cpu"))
            .unwrap_or_else(|| panic!("{what}: HPA has no cpu metric"));
        assert_eq!(
            cpu["resource"]["target"]["type"].as_str(),
            Some("Utilization")
        );
        assert_eq!(
            int_of(&cpu["resource"]["target"]["averageUtilization"], &what),
            HPA_CPU_PERCENT,
            "{what}: HPA cpu target"
        );

        for peer in d.peers.iter().map(|p| p.name) {
            let url = config.peer(peer).expect("checked").url.clone();
            peers.push((what.clone(), peer, url));
        }
    }

    // Peers point at the called service's Service name and gRPC port.
    assert!(
        !peers.is_empty(),
        "subscription and reseller-billing call the wallet"
    );
    for (what, peer, url) in peers {
        let target = peer_service(peer);
        let (svc_name, port) = &grpc_service_ports[target.name];
        let (host, url_port) = host_port(&url);
        assert!(
            host == *svc_name || host.starts_with(&format!("{svc_name}.")),
            "{what}: {peer} peer host {host} is not the Service {svc_name}"
        );
        assert_eq!(
            i64::from(url_port),
            *port,
            "{what}: {peer} peer port is not {svc_name}'s gRPC port"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Everything under deploy/ is covered.

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_deploy_file_is_checked() {
    let k8s = deploy().join("k8s");
    for file in yaml_files(&deploy()) {
        assert!(
            is_compose(&file) || file.starts_with(&k8s),
            "{}: a YAML file no test checks: put compose files at deploy/compose*.yaml and manifests under deploy/k8s/<service>/",
            file.display()
        );
        // Parses, without YAML 1.1 traps.
        yaml_docs(&file);
    }
    // Example configuration files load as the service they are named after.
    let config_dir = deploy().join("config");
    if config_dir.is_dir() {
        for entry in fs::read_dir(&config_dir).expect("deploy/config") {
            let path = entry.expect("dir entry").path();
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !file.ends_with(".toml") {
                continue;
            }
            let d = SERVICES
                .into_iter()
                .find(|d| file.starts_with(&format!("{}.", d.name)))
                .unwrap_or_else(|| panic!("{file}: name it <service>.*.toml"));
            let config = ServiceConfig::from_toml(&d, &read(&path), &Env::new())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(config.database_schema, d.schema, "{file}: database_schema");
        }
    }
}

#[test]
fn the_loader_reads_the_documented_settings() {
    // The unknown-variable checks rely on recording what the loader asks for: make sure the
    // recording sees every setting of `runtime::config`, peers included.
    for d in SERVICES {
        let env = Env::from([(
            format!("{}_TOKENS", d.env_prefix),
            secret_placeholder(&d, "TOKENS"),
        )]);
        let recording = Recording {
            env: &env,
            asked: RefCell::new(BTreeSet::new()),
        };
        ServiceConfig::load(&d, &recording).unwrap_or_else(|e| panic!("{}: {e}", d.name));
        let asked = recording.asked.into_inner();
        let mut expected: BTreeSet<String> = SETTINGS
            .iter()
            .map(|k| format!("{}_{k}", d.env_prefix))
            .collect();
        for peer in d.peers.iter().map(|p| p.name) {
            let peer = peer.to_uppercase();
            expected.insert(format!("{}_PEER_{peer}_URL", d.env_prefix));
            expected.insert(format!("{}_PEER_{peer}_TOKEN", d.env_prefix));
            expected.insert(format!("{}_PEER_{peer}_CA_PATH", d.env_prefix));
        }
        let missing: Vec<&String> = expected.difference(&asked).collect();
        assert!(
            missing.is_empty(),
            "{}: the loader never reads {missing:?}",
            d.name
        );
    }
}

#[test]
fn checks_fail_on_a_broken_environment() {
    // The loader-based checks reject a typo, a misplaced variable and a bad value.
    let d = credits_wallet::DEFAULTS;
    let good = Env::from([
        (
            "WALLET_TOKENS".to_string(),
            secret_placeholder(&d, "TOKENS"),
        ),
        (
            "WALLET_LISTEN_ADDR".to_string(),
            "0.0.0.0:50051".to_string(),
        ),
    ]);
    load("good", &d, &good);
    for (k, v) in [
        ("WALLET_LISTEN_ADRESS", "0.0.0.0:50051"),
        ("RESELLER_LOG_FORMAT", "json"),
        ("WALLET_LOG_FORMAT", "yaml"),
        ("WALLET_PEER_WALLET_URL", "http://credits-wallet:50051"),
    ] {
        let mut bad = good.clone();
        bad.insert(k.into(), v.into());
        let refused = std::panic::catch_unwind(|| load("bad", &d, &bad)).is_err();
        assert!(refused, "{k}={v} was accepted");
    }
}
