//! The event catalogue (issue 19): every event type a service's code emits is listed in
//! README.md's "Event catalogue" (one table per service: type, when, payload fields) and in the
//! `WatchEvents` comment of the service's proto; neither lists a type that no code emits; and
//! each README row names exactly the keys of the payloads the code writes for that type.
//!
//! The sources are read as text, not compiled: an event type is a quoted `"<prefix><name>"`
//! string in a service's `src/` (`"wallet.low_balance"`), and its payload is the first `json!`
//! object literal after it, or a call of a closure of the same file whose body is one
//! (`let payload = |p| json!({..})` ... `acct.event("wallet.payment_returned", payload(p))`).
//! A type emitted at several places has the union of their keys (the README says which are
//! conditional). A type string whose payload cannot be found that way fails the test with its
//! place, so a new way of emitting is noticed rather than skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// One service's sources and contract documents.
struct Service {
    /// The README table's heading names it: "#### `credits-wallet`".
    name: &'static str,
    src: &'static str,
    proto: &'static str,
    /// Every type the service emits starts with it (reseller-billing's own types too, the
    /// partner-wallet events it relays included: the `wallet.*` strings in its sources are the
    /// wallet's events it watches, not events it emits).
    prefix: &'static str,
    /// Keys the service's event-queueing method adds to every payload passed to it: the
    /// method's name and the keys.
    implicit: Option<(&'static str, &'static [&'static str])>,
}

const SERVICES: [Service; 3] = [
    Service {
        name: "credits-wallet",
        src: "services/credits-wallet/src",
        proto: "proto/billing/wallet/v1/wallet.proto",
        prefix: "wallet.",
        implicit: None,
    },
    Service {
        name: "subscription",
        src: "services/subscription/src",
        proto: "proto/billing/subscription/v1/subscription.proto",
        prefix: "subscription.",
        // `Unit::event` (services/subscription/src/unit.rs) adds the account and subscription
        // ids; `runtime::outbox::append` called directly adds nothing.
        implicit: Some(("event", &["account_id", "subscription_id"])),
    },
    Service {
        name: "reseller-billing",
        src: "services/reseller-billing/src",
        proto: "proto/billing/reseller/v1/reseller.proto",
        prefix: "reseller.",
        implicit: None,
    },
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One place in the sources where an event type is written.
#[derive(Debug)]
struct Emission {
    event_type: String,
    place: String,
    keys: BTreeSet<String>,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `"<prefix><snake_case>"` literals of `text`, each with the byte offset just after it.
fn type_literals(text: &str, prefix: &str) -> Vec<(String, usize)> {
    let quoted = format!("\"{prefix}");
    let mut out = Vec::new();
    for (at, _) in text.match_indices(&quoted) {
        let rest = &text[at + quoted.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].starts_with('"') {
            out.push((
                format!("{prefix}{name}"),
                at + quoted.len() + name.len() + 1,
            ));
        }
    }
    out
}

/// Closures of `text` whose body is a `json!` literal: name -> offset of that `json!(`.
fn payload_closures(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (at, _) in text.match_indices("let ") {
        let rest = &text[at + 4..];
        let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
        let Some(params) = rest[name.len()..].trim_start().strip_prefix('=') else {
            continue;
        };
        let Some(params) = params.trim_start().strip_prefix('|') else {
            continue;
        };
        let Some(end) = params.find('|') else {
            continue;
        };
        let body = params[end + 1..].trim_start();
        let body = body.strip_prefix('{').unwrap_or(body).trim_start();
        if body.starts_with("json!(") {
            out.insert(name, text.len() - body.len());
        }
    }
    out
}

/// The keys of the object literal of the `json!(` at `at`, or `None` if it is not `json!({`.
fn object_keys(text: &str, at: usize) -> Option<BTreeSet<String>> {
    let body = text[at..].strip_prefix("json!(")?.trim_start();
    let body = body.strip_prefix('{')?;
    let mut keys = BTreeSet::new();
    let mut depth = 1;
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(keys);
                }
            }
            '"' => {
                let mut literal = String::new();
                let mut end = i;
                while let Some((j, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = j;
                            break;
                        }
                        c => literal.push(c),
                    }
                }
                let after = body[end + 1..].trim_start();
                if depth == 1 && after.starts_with(':') && !after.starts_with("::") {
                    keys.insert(literal);
                }
            }
            _ => {}
        }
    }
    None
}

/// The name of the call whose argument list holds offset `at` (`event` for
/// `unit.event("..", json!(..))`), or `None` when `at` is not inside a call's arguments.
fn enclosing_call(text: &str, at: usize) -> Option<&str> {
    let mut depth = 0;
    for (i, c) in text[..at].char_indices().rev() {
        match c {
            ')' | ']' => depth += 1,
            '(' | '[' if depth > 0 => depth -= 1,
            '(' => {
                let before = &text[..i];
                let start = before.trim_end_matches(is_ident).len();
                return Some(&before[start..]);
            }
            '[' => return None,
            ';' | '{' | '}' if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

/// How far after a type string its payload may start (the longest today: reseller-billing's
/// relay, which maps the wallet's type and then reads the wallet's payload).
const PAYLOAD_WITHIN: usize = 800;

/// Every place `service`'s sources write one of its event types, with the payload's keys.
fn emissions(service: &Service) -> Vec<Emission> {
    let mut files = Vec::new();
    rust_files(&root().join(service.src), &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let closures = payload_closures(&text);
        let shown = file.strip_prefix(root()).unwrap_or(&file).display();
        for (event_type, after) in type_literals(&text, service.prefix) {
            let line = text[..after].lines().count();
            let place = format!("{shown}:{line}");
            // The first payload after the type: a `json!(` or a call of a payload closure.
            let mut window_end = (after + PAYLOAD_WITHIN).min(text.len());
            while !text.is_char_boundary(window_end) {
                window_end -= 1;
            }
            let window = &text[after..window_end];
            let literal = window.find("json!(").map(|i| (after + i, after + i));
            let call = closures
                .iter()
                .filter_map(|(name, body)| {
                    window
                        .match_indices(&format!("{name}("))
                        .map(|(i, _)| i)
                        .find(|&i| !window[..i].ends_with(is_ident))
                        .map(|i| (after + i, *body))
                })
                .min();
            let Some((site, json_at)) = [literal, call].into_iter().flatten().min() else {
                panic!(
                    "{place}: no payload (a json! object literal, or a closure returning one) \
                     follows the event type {event_type}; the catalogue test cannot read its \
                     fields"
                );
            };
            let Some(mut keys) = object_keys(&text, json_at) else {
                panic!("{place}: the payload of {event_type} is not a json!({{..}}) object");
            };
            if let Some((method, implicit)) = service.implicit
                && enclosing_call(&text, site) == Some(method)
            {
                keys.extend(implicit.iter().map(|k| k.to_string()));
            }
            out.push(Emission {
                event_type,
                place,
                keys,
            });
        }
    }
    out
}

/// An emitted type: the union of its payloads' keys, and where it is written.
#[derive(Debug, Default)]
struct Emitted {
    keys: BTreeSet<String>,
    places: Vec<String>,
}

/// Each type `service` emits.
fn emitted_types(service: &Service) -> BTreeMap<String, Emitted> {
    let emissions = emissions(service);
    assert!(
        emissions.len() >= 5,
        "{}: found only {emissions:?}",
        service.src
    );
    let mut types: BTreeMap<String, Emitted> = BTreeMap::new();
    for e in emissions {
        let t = types.entry(e.event_type).or_default();
        t.keys.extend(e.keys);
        t.places.push(e.place);
    }
    types
}

/// One README catalogue row: the fields its third cell names.
#[derive(Debug)]
struct Row {
    fields: BTreeSet<String>,
}

/// The README's "Event catalogue": service name -> type -> row.
fn readme_catalogue() -> BTreeMap<String, BTreeMap<String, Row>> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("\n### Event catalogue\n")
        .expect("README.md has an \"### Event catalogue\" section");
    let section = &readme[start + 1..];
    let end = ["\n## ", "\n### ", "<!-- end issue 19 -->"]
        .iter()
        .filter_map(|m| section[1..].find(m).map(|i| i + 1))
        .min()
        .unwrap_or(section.len());
    let mut catalogue: BTreeMap<String, BTreeMap<String, Row>> = BTreeMap::new();
    let mut service: Option<String> = None;
    for line in section[..end].lines() {
        if let Some(heading) = line.strip_prefix("#### ") {
            let name = heading.split('`').nth(1).unwrap_or(heading).to_string();
            catalogue.entry(name.clone()).or_default();
            service = Some(name);
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else {
            continue;
        };
        let service = service
            .as_ref()
            .unwrap_or_else(|| panic!("a catalogue row before any \"#### `<service>`\": {line}"));
        let cells: Vec<&str> = row.split(" | ").collect();
        assert!(cells.len() >= 3, "a catalogue row needs 3 cells: {line}");
        let event_type = cells[0].trim_end_matches('`').to_string();
        let fields = field_names(cells[2].trim_end_matches('|').trim());
        let previous = catalogue
            .entry(service.clone())
            .or_default()
            .insert(event_type.clone(), Row { fields });
        assert!(
            previous.is_none(),
            "{event_type} is listed twice for {service}"
        );
    }
    catalogue
}

/// The names a fields cell gives: "`a`: meaning; `b`, `c`: meaning" names a, b and c; "none"
/// names nothing. An item is a run of backticked names before a `:`, after the start or a `; `.
fn field_names(cell: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for item in cell.split("; ") {
        let Some((head, _)) = item.split_once(':') else {
            continue;
        };
        let listed: Option<Vec<&str>> = head
            .split(", ")
            .map(|n| {
                n.strip_prefix('`')
                    .and_then(|n| n.strip_suffix('`'))
                    .filter(|n| !n.is_empty() && n.chars().all(is_ident))
            })
            .collect();
        names.extend(listed.into_iter().flatten().map(str::to_string));
    }
    names
}

/// The event types the comment above `rpc WatchEvents` in `proto` names with `prefix`.
fn proto_watch_types(proto: &str, prefix: &str) -> (BTreeSet<String>, String) {
    let text = std::fs::read_to_string(root().join(proto)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let rpc = lines
        .iter()
        .position(|l| l.trim_start().starts_with("rpc WatchEvents("))
        .unwrap_or_else(|| panic!("{proto} has no rpc WatchEvents"));
    let comment: Vec<&str> = lines[..rpc]
        .iter()
        .rev()
        .map_while(|l| l.trim_start().strip_prefix("//"))
        .collect();
    let comment = comment.into_iter().rev().collect::<Vec<_>>().join("\n");
    let types = comment
        .split(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == '.'))
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
        .map(str::to_string)
        .collect();
    (types, comment)
}

/// Every event type a service emits is in the README's catalogue and its proto's WatchEvents
/// comment; both list only emitted types; the README's fields are the payload's keys.
#[test]
fn the_event_catalogue_lists_every_emitted_type_with_its_payload_fields() {
    let catalogue = readme_catalogue();
    let mut problems = Vec::new();
    for service in &SERVICES {
        let emitted = emitted_types(service);

        let listed = catalogue.get(service.name);
        if listed.is_none() {
            problems.push(format!(
                "README.md's Event catalogue has no \"#### `{}`\" table",
                service.name
            ));
        }
        let empty = BTreeMap::new();
        let listed = listed.unwrap_or(&empty);
        for (event_type, e) in &emitted {
            match listed.get(event_type) {
                None => problems.push(format!(
                    "{} emits {event_type} ({}), missing from README.md's Event catalogue",
                    service.name,
                    e.places.join(", ")
                )),
                Some(row) if row.fields != e.keys => problems.push(format!(
                    "README.md's Event catalogue gives {event_type} the fields {:?}; the code \
                     ({}) writes {:?}",
                    row.fields,
                    e.places.join(", "),
                    e.keys
                )),
                Some(_) => {}
            }
        }
        for event_type in listed.keys().filter(|t| !emitted.contains_key(*t)) {
            problems.push(format!(
                "README.md's Event catalogue lists {event_type} under {}, which no code there \
                 emits",
                service.name
            ));
        }

        let (documented, comment) = proto_watch_types(service.proto, service.prefix);
        for event_type in emitted.keys().filter(|t| !documented.contains(*t)) {
            problems.push(format!(
                "{} emits {event_type}, missing from the WatchEvents comment of {}",
                service.name, service.proto
            ));
        }
        for event_type in documented.iter().filter(|t| !emitted.contains_key(*t)) {
            problems.push(format!(
                "the WatchEvents comment of {} lists {event_type}, which {} does not emit",
                service.proto, service.name
            ));
        }
        if !comment.contains("Event catalogue") {
            problems.push(format!(
                "the WatchEvents comment of {} does not point to README.md's Event catalogue",
                service.proto
            ));
        }
    }
    for name in catalogue.keys() {
        if !SERVICES.iter().any(|s| s.name == name) {
            problems.push(format!(
                "README.md's Event catalogue has a table for {name}, not a service"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The subscription service's implicit keys are what `Unit::event` really adds.
#[test]
fn the_subscription_unit_adds_the_account_and_subscription_ids_to_its_events() {
    let unit = std::fs::read_to_string(root().join("services/subscription/src/unit.rs")).unwrap();
    let method = unit
        .find("pub fn event(&mut self, event_type: &'static str, mut payload: Value)")
        .expect("Unit::event is where the catalogue test expects it");
    let body = &unit[method..method + unit[method..].find("\n    }\n").unwrap()];
    for key in ["account_id", "subscription_id"] {
        assert!(
            body.contains(&format!("map.insert(\"{key}\".into()")),
            "Unit::event no longer adds {key}: update SERVICES in tests/src/catalogue.rs"
        );
    }
}

/// The scanner's own pieces, on small inputs.
#[test]
fn the_payload_reader_finds_literals_closures_and_the_enclosing_call() {
    let text = r#"
        let (ok, failed) = ("wallet.a", "wallet.b");
        let payload = |p: &P| {
            json!({"x": p.x, "nested": json!({"inner": 1}), "s": "a: b", "y": f(1, 2)})
        };
        acct.event(ok, payload(p));
        unit.event("wallet.c", json!({}));
        outbox::append(tx, "wallet.d", &id, &json!({"k": [1, 2]}), at);
    "#;
    let closures = payload_closures(text);
    assert_eq!(closures.keys().collect::<Vec<_>>(), ["payload"]);
    let keys = object_keys(text, closures["payload"]).unwrap();
    assert_eq!(keys, ["nested", "s", "x", "y"].map(String::from).into());
    let types: Vec<String> = type_literals(text, "wallet.")
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(types, ["wallet.a", "wallet.b", "wallet.c", "wallet.d"]);
    let c = text.find("json!({})").unwrap();
    assert_eq!(enclosing_call(text, c), Some("event"));
    assert_eq!(object_keys(text, c), Some(BTreeSet::new()));
    let d = text.find("&json!({\"k\"").unwrap() + 1;
    assert_eq!(enclosing_call(text, d), Some("append"));
    assert_eq!(object_keys(text, d), Some(["k".to_string()].into()));
    assert_eq!(enclosing_call(text, closures["payload"]), None);
    assert_eq!(
        field_names("`a`: one; `b`, `c`: two (`x`: not a field); none"),
        ["a", "b", "c"].map(String::from).into()
    );
    assert_eq!(field_names("none"), BTreeSet::new());
}
