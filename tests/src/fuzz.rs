//! Bad input for every RPC: for each RPC of the three services (found from the proto
//! descriptors, so an RPC added tomorrow is fuzzed too), requests are built field by field from
//! its input descriptor with random and boundary values (empty and huge strings, control
//! characters, non-UTF-8 bytes where a string is expected, negative and huge numbers, amounts
//! with too many decimals, unknown enum values, timestamps far out, nested messages, repeated
//! fields) and encoded by hand, so the wire can carry what the generated types never would.
//!
//! Every answer must be a code a client can act on (never `INTERNAL`, `UNKNOWN`,
//! `UNIMPLEMENTED`, `DATA_LOSS`, nor `RESOURCE_EXHAUSTED`: nothing here is over a limit, and
//! tonic reports an HTTP/2 connection reset by the server, e.g. for a status message too large
//! for its header, with that code); every refused call must leave the called service's outbox
//! as it was (an event exists iff a change committed); the service must stay up; and the
//! wallet's books must verify at the end. The seed is fixed, so a failure reproduces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use prost::encoding::{WireType, encode_key, encode_varint};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use proto::{
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    subscription::v1::{
        self as spb, catalog_client::CatalogClient, subscriptions_client::SubscriptionsClient,
    },
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use runtime::{
    Running,
    testing::{ADMIN_TOKEN, authed},
};
use sqlx::Row;
use tonic::Code;

use crate::{Suite, channel, limits::call_raw};

/// Requests per RPC.
const CASES_PER_RPC: usize = 40;
const SEED: u64 = 0x5eed_b111_1a9e;

/// SplitMix64: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

/// Ids that exist (seeded before the run), so some requests get past the lookups.
const KNOWN_IDS: &[&str] = &[
    "w-1",
    "acct-1",
    "plan-1",
    "partner-1",
    "cust-1",
    "partner:partner-1",
    "sms",
    "u-admin",
];
const DECIMALS: &[&str] = &[
    "0",
    "1",
    "0.01",
    "9.99",
    "-1",
    "-0.01",
    "0.001",
    "0.123456789012345678901234567890",
    "79228162514264337593543950335",
    "79228162514264337593543950336",
    "1e3",
    "NaN",
    "1,5",
    " 1",
    "0x10",
    "",
];
const CURRENCIES: &[&str] = &["EUR", "USD", "eur", "XXX", "EURO", "", "€"];
const PAYMENT_METHODS: &[&str] = &[
    // pm_card_timeout and the direct debits are left out: their outcome arrives later from a
    // background job, which would move the outbox between two calls and blur the check.
    "pm_card_ok",
    "pm_card_declined",
    "pm_card_insufficient_funds",
    "pm_unknown",
    "",
];

fn string_value(rng: &mut Rng, field: &str) -> Vec<u8> {
    let generic: &[&[u8]] = &[
        b"",
        b" ",
        b"a b",
        b"\0",
        b"line\nbreak",
        "ü€😀".as_bytes(),
        b"\xff\xfe\xfd",
        b"valid-then-\xc3\x28",
        b"../../etc/passwd",
        b"'; DROP TABLE wallets; --",
        b"%s%n",
    ];
    let lower = field.to_ascii_lowercase();
    match rng.below(10) {
        0 => "x".repeat(rng.below(3) * 64 * 1024 + 129).into_bytes(),
        1..=3 => rng.pick(generic).to_vec(),
        _ if lower.contains("price")
            || lower.contains("amount")
            || lower.contains("rate")
            || lower.contains("credits_per") =>
        {
            rng.pick(DECIMALS).as_bytes().to_vec()
        }
        _ if lower.contains("currency") => rng.pick(CURRENCIES).as_bytes().to_vec(),
        _ if lower.contains("payment_method") => rng.pick(PAYMENT_METHODS).as_bytes().to_vec(),
        _ if lower.contains("token") => format!("tok-{}", rng.next() % 1000).into_bytes(),
        _ if lower.ends_with("_id") || lower.contains("code") => {
            rng.pick(KNOWN_IDS).as_bytes().to_vec()
        }
        _ if lower.contains("key") => format!("fz-{}", rng.next() % 64).into_bytes(),
        _ => rng.pick(KNOWN_IDS).as_bytes().to_vec(),
    }
}

/// A value the field would plausibly carry in a valid request, chosen by its name.
fn plausible_string(rng: &mut Rng, field: &str) -> Vec<u8> {
    let lower = field.to_ascii_lowercase();
    let v: String = match lower.as_str() {
        "wallet_id" => rng
            .pick(&["w-1", "acct-1", "partner:partner-1"])
            .to_string(),
        "account_id" => "acct-1".into(),
        "plan_id" => "plan-1".into(),
        "partner_id" => "partner-1".into(),
        "customer_id" => "cust-1".into(),
        "user_id" => "u-admin".into(),
        "currency" => "EUR".into(),
        "code" => "sms".into(),
        "vat_rate" => "0.21".into(),
        "page_token" | "preview_token" => String::new(),
        _ if lower.contains("payment_method") => "pm_card_ok".into(),
        _ if lower.contains("price") || lower.contains("amount") || lower.contains("rate") => {
            rng.pick(&["0.01", "1", "9.99"]).to_string()
        }
        _ if lower.contains("credits_per") => "1".into(),
        _ if lower.contains("key") => format!("fzp-{}", rng.next() % 100_000),
        _ if lower.ends_with("_id") => format!("id-{}", rng.next() % 8),
        _ => "plausible".into(),
    };
    v.into_bytes()
}

fn unsigned(rng: &mut Rng) -> u64 {
    *rng.pick(&[
        0,
        1,
        2,
        10,
        100,
        1_000,
        10_000,
        1_000_000,
        u64::from(u32::MAX),
        1 << 53,
        i64::MAX as u64,
        u64::MAX,
    ])
}

fn signed(rng: &mut Rng) -> i64 {
    *rng.pick(&[
        0,
        1,
        -1,
        100,
        -100,
        i64::from(i32::MAX),
        i64::from(i32::MIN),
        i64::MAX,
        i64::MIN,
    ])
}

/// A `google.protobuf.Timestamp`, often far out or malformed.
fn timestamp(rng: &mut Rng) -> Vec<u8> {
    let seconds: i64 = *rng.pick(&[
        0,
        1_767_225_600,   // 2026-01-01
        1_800_000_000,   // 2027
        -62_135_596_801, // before year 1
        253_402_300_800, // after year 9999
        i64::MAX,
        i64::MIN,
        -1,
    ]);
    let nanos: i64 = *rng.pick(&[0, 1, 999_999_999, 1_000_000_000, -1]);
    let mut out = Vec::new();
    encode_key(1, WireType::Varint, &mut out);
    encode_varint(seconds as u64, &mut out);
    if nanos != 0 {
        encode_key(2, WireType::Varint, &mut out);
        encode_varint(nanos as u64, &mut out);
    }
    out
}

/// Encodes one value of `field`: a plausible one (`plausible`) or a random or boundary one.
fn encode_field(
    rng: &mut Rng,
    field: &FieldDescriptor,
    depth: usize,
    plausible: bool,
    out: &mut Vec<u8>,
) {
    let n = field.number();
    if plausible {
        return encode_plausible(rng, field, depth, out);
    }
    match field.kind() {
        Kind::String => {
            let v = string_value(rng, field.name());
            encode_key(n, WireType::LengthDelimited, out);
            encode_varint(v.len() as u64, out);
            out.extend(v);
        }
        Kind::Bytes => {
            let len = rng.below(64);
            encode_key(n, WireType::LengthDelimited, out);
            encode_varint(len as u64, out);
            out.extend((0..len).map(|_| rng.next() as u8));
        }
        Kind::Uint32 | Kind::Uint64 | Kind::Bool => {
            encode_key(n, WireType::Varint, out);
            encode_varint(unsigned(rng), out);
        }
        Kind::Int32 | Kind::Int64 => {
            encode_key(n, WireType::Varint, out);
            encode_varint(signed(rng) as u64, out);
        }
        Kind::Sint32 | Kind::Sint64 => {
            let v = signed(rng);
            encode_key(n, WireType::Varint, out);
            encode_varint(((v << 1) ^ (v >> 63)) as u64, out);
        }
        Kind::Enum(e) => {
            let known: Vec<i32> = e.values().map(|v| v.number()).collect();
            let v = if rng.chance(70) {
                *rng.pick(&known)
            } else {
                *rng.pick(&[-1, 99, i32::MAX, i32::MIN])
            };
            encode_key(n, WireType::Varint, out);
            encode_varint(i64::from(v) as u64, out);
        }
        Kind::Fixed32 | Kind::Sfixed32 | Kind::Float => {
            encode_key(n, WireType::ThirtyTwoBit, out);
            out.extend((rng.next() as u32).to_le_bytes());
        }
        Kind::Fixed64 | Kind::Sfixed64 | Kind::Double => {
            encode_key(n, WireType::SixtyFourBit, out);
            out.extend(rng.next().to_le_bytes());
        }
        Kind::Message(m) => {
            let body = if m.full_name() == "google.protobuf.Timestamp" {
                timestamp(rng)
            } else if depth < 3 {
                message(rng, &m, depth + 1)
            } else {
                Vec::new()
            };
            encode_key(n, WireType::LengthDelimited, out);
            encode_varint(body.len() as u64, out);
            out.extend(body);
        }
    }
}

fn encode_plausible(rng: &mut Rng, field: &FieldDescriptor, depth: usize, out: &mut Vec<u8>) {
    let n = field.number();
    match field.kind() {
        Kind::String => {
            let v = plausible_string(rng, field.name());
            encode_key(n, WireType::LengthDelimited, out);
            encode_varint(v.len() as u64, out);
            out.extend(v);
        }
        Kind::Message(m) => {
            let body = if m.full_name() == "google.protobuf.Timestamp" {
                // Within the months after the test clock's start.
                let mut t = Vec::new();
                encode_key(1, WireType::Varint, &mut t);
                encode_varint(1_767_225_600 + 86_400 * (1 + rng.next() % 120), &mut t);
                t
            } else if depth < 3 {
                plausible_message(rng, &m, depth + 1, None)
            } else {
                Vec::new()
            };
            encode_key(n, WireType::LengthDelimited, out);
            encode_varint(body.len() as u64, out);
            out.extend(body);
        }
        Kind::Enum(e) => {
            let known: Vec<i32> = e.values().map(|v| v.number()).filter(|v| *v != 0).collect();
            let v = if known.is_empty() {
                0
            } else {
                *rng.pick(&known)
            };
            encode_key(n, WireType::Varint, out);
            encode_varint(i64::from(v) as u64, out);
        }
        Kind::Bool => {
            encode_key(n, WireType::Varint, out);
            encode_varint(rng.next() % 2, out);
        }
        Kind::Uint32 | Kind::Uint64 | Kind::Int32 | Kind::Int64 => {
            let v = if field.name() == "days" {
                30
            } else {
                *rng.pick(&[1, 10, 100, 1_000])
            };
            encode_key(n, WireType::Varint, out);
            encode_varint(v, out);
        }
        _ => encode_field(rng, field, depth, false, out),
    }
}

/// A request that would plausibly be valid (every field set, ids that exist, amounts that
/// parse), except `wild`: that field (by number) gets a random or boundary value. It reaches
/// the rules behind the first checks, one bad field at a time.
fn plausible_message(
    rng: &mut Rng,
    desc: &MessageDescriptor,
    depth: usize,
    wild: Option<u32>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut oneofs_set = Vec::new();
    for field in desc.fields() {
        if let Some(oneof) = field.containing_oneof() {
            if oneofs_set.contains(&oneof.name().to_string()) {
                continue;
            }
            oneofs_set.push(oneof.name().to_string());
        }
        let bad = wild == Some(field.number());
        let times = if field.is_list() || field.is_map() {
            if bad { rng.below(4) } else { 1 }
        } else {
            1
        };
        for _ in 0..times {
            encode_field(rng, &field, depth, !bad, &mut out);
        }
    }
    out
}

/// A random encoding of `desc`: each field present or not, repeated ones 0 to 3 times, at most
/// one member of each oneof.
fn message(rng: &mut Rng, desc: &MessageDescriptor, depth: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut oneofs_set = Vec::new();
    for field in desc.fields() {
        if rng.chance(25) {
            continue;
        }
        if let Some(oneof) = field.containing_oneof() {
            if oneofs_set.contains(&oneof.name().to_string()) {
                continue;
            }
            oneofs_set.push(oneof.name().to_string());
        }
        let times = if field.is_list() || field.is_map() {
            rng.below(4)
        } else {
            1
        };
        for _ in 0..times {
            encode_field(rng, &field, depth, false, &mut out);
        }
    }
    out
}

/// Events only the subscription's background jobs write (period-end and trial work), which they
/// may write at any moment after an accepted call created something due, e.g. a trial of one
/// day gets its ending notice (S14) at once even on the frozen test clock. They are left out of
/// the count, since they do not come from the call being checked.
const JOB_EVENTS: &[&str] = &[
    "subscription.trial_ending",
    "subscription.trial_expired",
    "subscription.trial_converted",
    "subscription.renewed",
    "subscription.credits_granted",
    "subscription.credits_waiting_for_wallet",
];

/// Outbox rows a call could have written.
async fn outbox_rows(running: &Running) -> i64 {
    let excluded = JOB_EVENTS
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(&format!(
        "SELECT COUNT(*) FROM outbox WHERE event_type NOT IN ({excluded})"
    ))
    .fetch_one(running.platform.db.pool())
    .await
    .unwrap()
    .get(0)
}

/// Things that exist before the run, so requests naming them reach the deeper rules.
async fn seed(suite: &Suite) {
    let pricing = wpb::CreditPricing {
        mode: wpb::TierMode::Volume as i32,
        tiers: vec![wpb::PriceTier {
            first: 1,
            last: 0,
            unit_price: "0.01".into(),
            flat_price: String::new(),
        }],
    };
    let rating = wpb::RatingRule {
        credits_per_recipient: "1".into(),
        per_mailing_surcharge: 0,
    };
    let mut wallet = CreditsWalletClient::new(channel(&suite.wallet).await.unwrap());
    for id in ["w-1", "acct-1"] {
        wallet
            .open_wallet(authed(
                ADMIN_TOKEN,
                wpb::OpenWalletRequest {
                    idempotency_key: format!("seed-open-{id}"),
                    wallet_id: id.into(),
                    currency: "EUR".into(),
                    pricing: Some(pricing.clone()),
                    rating: Some(rating.clone()),
                    signup_credits: 0,
                    signup_credits_expire_at: None,
                },
            ))
            .await
            .unwrap();
        wallet
            .grant_credits(authed(
                ADMIN_TOKEN,
                wpb::GrantCreditsRequest {
                    idempotency_key: format!("seed-grant-{id}"),
                    wallet_id: id.into(),
                    credits: 1_000_000,
                    kind: wpb::LotKind::Promotional as i32,
                    expires_at: None,
                    reference: String::new(),
                },
            ))
            .await
            .unwrap();
    }
    let mut catalog = CatalogClient::new(channel(&suite.subscription).await.unwrap());
    catalog
        .publish_plan(authed(
            ADMIN_TOKEN,
            spb::PublishPlanRequest {
                idempotency_key: "seed-plan".into(),
                plan: Some(plan()),
            },
        ))
        .await
        .unwrap();
    let mut subs = SubscriptionsClient::new(channel(&suite.subscription).await.unwrap());
    subs.subscribe(authed(
        ADMIN_TOKEN,
        crate::card_subscribe(
            "seed-sub".into(),
            Some(spb::Actor {
                user_id: "u-admin".into(),
                billing_permission: true,
            }),
            "acct-1",
            "plan-1",
            5_000,
        ),
    ))
    .await
    .unwrap();
    let mut reseller = ResellerBillingClient::new(channel(&suite.reseller).await.unwrap());
    reseller
        .register_partner(authed(
            ADMIN_TOKEN,
            rpb::RegisterPartnerRequest {
                idempotency_key: "seed-partner".into(),
                partner_id: "partner-1".into(),
                currency: "EUR".into(),
                funding: rpb::PartnerFunding::Prepaid as i32,
                payment_method: String::new(),
                pricing: Some(pricing),
                rating: Some(rating),
            },
        ))
        .await
        .unwrap();
    reseller
        .add_customer(authed(
            ADMIN_TOKEN,
            rpb::AddCustomerRequest {
                idempotency_key: "seed-customer".into(),
                partner_id: "partner-1".into(),
                customer_id: "cust-1".into(),
                billing_mode: rpb::BillingMode::PartnerPays as i32,
            },
        ))
        .await
        .unwrap();
}

/// A valid plan without monthly credits (whose grants would reach the wallet in the background).
pub(crate) fn plan() -> spb::PlanSpec {
    spb::PlanSpec {
        plan_id: "plan-1".into(),
        name: "Email".into(),
        product: spb::Product::Marketing as i32,
        level: Some(spb::Level {
            name: "starter".into(),
            rank: 1,
        }),
        interval: spb::Interval::Month as i32,
        currency: "EUR".into(),
        contact_tiers: Some(spb::ContactTiers {
            mode: spb::TierMode::Graduated as i32,
            tiers: vec![spb::PriceTier {
                first: 1,
                last: 0,
                unit_price: "0.006".into(),
                flat_price: String::new(),
            }],
        }),
        slider: Some(spb::Slider {
            min: 1_000,
            max: 50_000,
            step: 1_000,
        }),
        included_seats: 1,
        seat_price: "5".into(),
        add_ons: vec![spb::AddOn {
            code: "sms".into(),
            name: "SMS".into(),
            price: "9.99".into(),
        }],
        proration: spb::ProrationPolicy::ProrateToCycleEnd as i32,
        self_serve: Some(spb::SelfServe {
            downgrade: true,
            remove_add_on: true,
            change_product: false,
            unbundle: false,
        }),
        trial: Some(spb::TrialTerms {
            days: 30,
            contact_cap: 0,
            free_mails: 200,
        }),
        monthly_credits: 0,
    }
}

#[tokio::test]
async fn every_rpc_answers_bad_input_with_a_clear_code_and_refusals_change_nothing() {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let suite = Suite::start().await.unwrap();
    seed(&suite).await;
    let mut rng = Rng(SEED);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let (mut calls, mut refused, mut rpcs, mut non_utf8) = (0, 0, 0, 0);
    // The wallet first: subscription and reseller calls may reach it.
    for (services, running) in suite.all() {
        let ch = channel(running).await.unwrap();
        for name in services {
            let service = pool.get_service_by_name(name).unwrap();
            for method in service.methods() {
                rpcs += 1;
                let path = format!("/{name}/{}", method.name());
                // Deterministically first: a string field that is not UTF-8 on the wire is
                // the sender's mistake (prost alone would answer INTERNAL; proto/src/codec.rs).
                if let Some(field) = method
                    .input()
                    .fields()
                    .find(|f| matches!(f.kind(), Kind::String) && !f.is_list() && !f.is_map())
                {
                    let mut body = Vec::new();
                    encode_key(field.number(), WireType::LengthDelimited, &mut body);
                    encode_varint(2, &mut body);
                    body.extend([0xff, 0xfe]);
                    let before = outbox_rows(running).await;
                    let answer = call_raw(
                        ch.clone(),
                        &path,
                        method.is_server_streaming(),
                        body,
                        Duration::from_millis(20),
                    )
                    .await;
                    calls += 1;
                    non_utf8 += 1;
                    let status = answer.expect_err("a non-UTF-8 string is refused");
                    assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
                    assert!(status.message().contains("malformed"), "{path}: {status:?}");
                    assert_eq!(outbox_rows(running).await, before);
                }
                for case in 0..CASES_PER_RPC {
                    // Half the cases random throughout; half plausible but for one field
                    // (every field in turn), or for none.
                    let input = method.input();
                    let body = if case % 2 == 0 {
                        message(&mut rng, &input, 0)
                    } else {
                        let fields: Vec<u32> = input.fields().map(|f| f.number()).collect();
                        let wild = fields.get((case / 2) % (fields.len() + 1)).copied();
                        plausible_message(&mut rng, &input, 0, wild)
                    };
                    let before = outbox_rows(running).await;
                    // A stream dropped after a moment is reset by the client; many resets on
                    // one connection make the HTTP/2 server close it (ENHANCE_YOUR_CALM), so
                    // each stream gets a connection of its own.
                    let on = if method.is_server_streaming() {
                        channel(running).await.unwrap()
                    } else {
                        ch.clone()
                    };
                    let answer = call_raw(
                        on,
                        &path,
                        method.is_server_streaming(),
                        body.clone(),
                        Duration::from_millis(20),
                    )
                    .await;
                    calls += 1;
                    let code = answer.as_ref().err().map_or(Code::Ok, |s| s.code());
                    *codes.entry(format!("{code:?}")).or_default() += 1;
                    if let Err(status) = &answer {
                        refused += 1;

                        if matches!(
                            code,
                            Code::Internal
                                | Code::Unknown
                                | Code::Unimplemented
                                | Code::DataLoss
                                | Code::Unauthenticated
                                | Code::ResourceExhausted
                        ) {
                            failures.push(format!(
                                "{path} case {case}: {code:?} {:?} for {body:02x?}",
                                status.message()
                            ));
                        }
                        let after = outbox_rows(running).await;
                        if after != before {
                            let new: Vec<String> = sqlx::query(
                                "SELECT event_type, subject, payload FROM outbox ORDER BY event_id",
                            )
                            .fetch_all(running.platform.db.pool())
                            .await
                            .unwrap()
                            .iter()
                            .map(|r| {
                                format!(
                                    "{} {} {}",
                                    r.get::<String, _>(0),
                                    r.get::<String, _>(1),
                                    r.get::<String, _>(2)
                                )
                            })
                            .collect();
                            failures.push(format!(
                                "{path} case {case}: refused with {code:?} ({}) but the outbox \
                                 went from {before} to {after} rows; all events: {new:?}",
                                status.message()
                            ));
                        }
                    }
                }
                let health = call_raw(
                    ch.clone(),
                    "/grpc.health.v1.Health/Check",
                    false,
                    Vec::new(),
                    Duration::ZERO,
                )
                .await;
                assert!(health.is_ok(), "{path} left the service down: {health:?}");
            }
        }
    }
    let mut wallet = CreditsWalletClient::new(channel(&suite.wallet).await.unwrap());
    let report = wallet
        .verify_ledger(authed(ADMIN_TOKEN, wpb::VerifyLedgerRequest::default()))
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "fuzz: {rpcs} RPCs, {calls} requests (seed {SEED:#x}; {non_utf8} with a non-UTF-8 string \
         field, all INVALID_ARGUMENT), {refused} random ones refused; codes {codes:?}; \
         VerifyLedger: {} wallets, {} entries, {} violations; failures: {}",
        report.wallets_checked,
        report.entries_checked,
        report.violations_total,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(report.violations, [], "the books verify after the run");
    assert!(rpcs >= 50, "only {rpcs} RPCs found");
    suite.stop().await.unwrap();
}
