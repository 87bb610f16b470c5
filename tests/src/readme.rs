//! Every `grpcurl` example in README.md, executed against the running suite the way grpcurl
//! does it: the method and its message types come from the server's own reflection service,
//! the request is the example's JSON turned into protobuf by a dynamic message (prost-reflect),
//! and the answer is checked. A README example that stops working fails CI.
//!
//! An example answers OK unless the comment above it names a code (`Code: Unauthenticated`).
//! The README's fixed addresses are mapped to the test's services.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use tonic::{
    Code,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::Suite;

/// One grpcurl invocation from the README.
#[derive(Debug)]
struct Example {
    line: String,
    headers: Vec<(String, String)>,
    data: String,
    address: String,
    command: Vec<String>,
    expected: Code,
}

/// Splits a shell line into words, honouring single quotes (the README's only quoting).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn code_named(name: &str) -> Option<Code> {
    Some(match name {
        "Unauthenticated" => Code::Unauthenticated,
        "PermissionDenied" => Code::PermissionDenied,
        "InvalidArgument" => Code::InvalidArgument,
        "NotFound" => Code::NotFound,
        "AlreadyExists" => Code::AlreadyExists,
        "FailedPrecondition" => Code::FailedPrecondition,
        _ => return None,
    })
}

fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut comment = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            comment.clear();
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            comment = c.to_string();
            continue;
        }
        if !line.starts_with("grpcurl ") {
            comment.clear();
            continue;
        }
        let w = words(line);
        let mut headers = Vec::new();
        let mut data = "{}".to_string();
        let mut rest = Vec::new();
        let mut i = 1;
        while i < w.len() {
            match w[i].as_str() {
                "-plaintext" => i += 1,
                "-H" => {
                    let (k, v) = w[i + 1].split_once(": ").expect("header as 'name: value'");
                    headers.push((k.to_lowercase(), v.to_string()));
                    i += 2;
                }
                "-d" => {
                    data = w[i + 1].clone();
                    i += 2;
                }
                other => {
                    rest.push(other.to_string());
                    i += 1;
                }
            }
        }
        let expected = comment
            .split("Code: ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_alphanumeric()).next())
            .and_then(code_named)
            .unwrap_or(Code::Ok);
        out.push(Example {
            line: line.to_string(),
            headers,
            data,
            address: rest[0].clone(),
            command: rest[1..].to_vec(),
            expected,
        });
        comment.clear();
    }
    out
}

/// Passes protobuf bytes through unchanged: the dynamic message encodes and decodes.
#[derive(Clone, Default)]
pub(crate) struct RawCodec;

pub(crate) struct RawCoder;

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

async fn reflect(channel: Channel, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    stream
        .next()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

fn file_protos(answer: MessageResponse) -> Result<Vec<prost_types::FileDescriptorProto>, String> {
    match answer {
        MessageResponse::FileDescriptorResponse(files) => Ok(files
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
            .collect()),
        MessageResponse::ErrorResponse(e) => Err(format!("reflection: {}", e.error_message)),
        other => Err(format!("unexpected reflection answer {other:?}")),
    }
}

/// The descriptors of `symbol` and, as grpcurl fetches them, every file it imports by name.
async fn pool_for(channel: Channel, symbol: &str) -> Result<DescriptorPool, String> {
    let mut files: BTreeMap<String, prost_types::FileDescriptorProto> = BTreeMap::new();
    let mut wanted: Vec<String> = Vec::new();
    for f in file_protos(
        reflect(
            channel.clone(),
            MessageRequest::FileContainingSymbol(symbol.into()),
        )
        .await,
    )? {
        wanted.extend(f.dependency.iter().cloned());
        files.insert(f.name().to_string(), f);
    }
    while let Some(name) = wanted.pop() {
        if files.contains_key(&name) {
            continue;
        }
        for f in file_protos(reflect(channel.clone(), MessageRequest::FileByFilename(name)).await)?
        {
            wanted.extend(f.dependency.iter().cloned());
            files.insert(f.name().to_string(), f);
        }
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(files.into_values())
        .map_err(|e| e.to_string())?;
    Ok(pool)
}

async fn call(
    channel: Channel,
    method: &MethodDescriptor,
    request: DynamicMessage,
    headers: &[(String, String)],
) -> Result<Vec<DynamicMessage>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(request.encode_to_vec());
    for (k, v) in headers {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let path: http::uri::PathAndQuery =
        format!("/{}/{}", method.parent_service().full_name(), method.name())
            .parse()
            .unwrap();
    let decode =
        |bytes: Vec<u8>| DynamicMessage::decode(method.output(), bytes.as_slice()).unwrap();
    if method.is_server_streaming() {
        // A stream stays open (WatchEvents): it must start, and what arrives must decode.
        let mut stream = grpc
            .server_streaming(req, path, RawCodec)
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Ok(Some(item)) =
            tokio::time::timeout(Duration::from_millis(500), stream.next()).await
        {
            out.push(decode(item?));
        }
        Ok(out)
    } else {
        Ok(vec![decode(
            grpc.unary(req, path, RawCodec).await?.into_inner(),
        )])
    }
}

#[tokio::test]
async fn every_grpcurl_example_in_the_readme_works_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let examples = examples(&readme);
    assert!(
        examples.len() >= 10,
        "README examples found: {}",
        examples.len()
    );
    // Started as README command 1 starts it (the suite's own defaults: its development token,
    // the peers), on ports 0 and a fresh database.
    let suite = Suite::start_as_readme(runtime::testing::TestDatabase::fresh(), "dev-admin-token")
        .await
        .unwrap();
    play(&suite, &examples).await;
    suite.stop().await.unwrap();
}

#[test]
fn the_readme_parser_reads_quotes_headers_and_expected_codes() {
    let readme = "```sh\n# Refused: Code: Unauthenticated, \"missing\"\ngrpcurl -plaintext -H 'authorization: Bearer t' -d '{\"a\": \"b c\"}' 127.0.0.1:1 x.Y/Z\ngrpcurl -plaintext 127.0.0.1:1 list\n```\n";
    let ex = examples(readme);
    assert_eq!(ex.len(), 2);
    assert_eq!(
        ex[0].headers,
        [("authorization".to_string(), "Bearer t".to_string())]
    );
    assert_eq!(ex[0].data, "{\"a\": \"b c\"}");
    assert_eq!(ex[0].expected, Code::Unauthenticated);
    assert_eq!(ex[1].command, ["list"]);
    assert_eq!(ex[1].expected, Code::Ok);
}

/// Runs `examples` against `suite`, each checked for its expected code.
async fn play(suite: &Suite, examples: &[Example]) {
    let addresses: BTreeMap<&str, std::net::SocketAddr> = [
        ("127.0.0.1:50051", suite.wallet.addr),
        ("127.0.0.1:50052", suite.subscription.addr),
        ("127.0.0.1:50053", suite.reseller.addr),
    ]
    .into();
    for ex in examples {
        let addr = addresses
            .get(ex.address.as_str())
            .unwrap_or_else(|| panic!("unknown address in: {}", ex.line));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        match ex.command[0].as_str() {
            "list" => match reflect(channel, MessageRequest::ListServices(String::new())).await {
                MessageResponse::ListServicesResponse(l) => {
                    assert!(
                        l.service.iter().any(|s| s.name == "grpc.health.v1.Health"),
                        "{}",
                        ex.line
                    )
                }
                other => panic!("{}: {other:?}", ex.line),
            },
            "describe" => {
                let pool = pool_for(channel, &ex.command[1]).await.unwrap();
                assert!(
                    pool.get_service_by_name(&ex.command[1]).is_some(),
                    "{}",
                    ex.line
                );
            }
            full_method => {
                let (service, method) = full_method.rsplit_once('/').expect("service/method");
                let pool = pool_for(channel.clone(), service)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", ex.line));
                let method = pool
                    .get_service_by_name(service)
                    .and_then(|s| s.methods().find(|m| m.name() == method))
                    .unwrap_or_else(|| panic!("no such method: {}", ex.line));
                let mut de = serde_json::Deserializer::from_str(&ex.data);
                let request = DynamicMessage::deserialize(method.input(), &mut de)
                    .unwrap_or_else(|e| panic!("{}: request JSON does not fit: {e}", ex.line));
                match call(channel, &method, request, &ex.headers).await {
                    Ok(answers) => {
                        assert_eq!(
                            ex.expected,
                            Code::Ok,
                            "expected {:?}, got OK: {}",
                            ex.expected,
                            ex.line
                        );
                        for a in answers {
                            serde_json::to_string(&a).unwrap();
                        }
                    }
                    Err(status) => assert_eq!(
                        status.code(),
                        ex.expected,
                        "{}: {}",
                        ex.line,
                        status.message()
                    ),
                }
            }
        }
    }
}

/// The README's examples again with `payment_provider = "stripe"` on the wallet and
/// subscription (against localstripe, `runtime::testing::localstripe`): every payment the
/// examples make (the wallet purchase, the subscription's invoice, the partner's purchase) goes
/// to Stripe, with a Stripe customer and card in place of the simulator's `pm_card_ok`.
#[tokio::test]
async fn the_readme_examples_pay_through_stripe_when_it_is_the_provider() {
    let Some(url) = runtime::testing::localstripe::url() else {
        return;
    };
    let card = runtime::testing::localstripe::customer_with_card(
        &url,
        runtime::testing::localstripe::CARD_OK,
    )
    .await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut examples = examples(&readme);
    let paying = examples
        .iter()
        .filter(|e| e.data.contains("\"pm_card_ok\""))
        .count();
    assert!(paying >= 3, "README examples paying by card: {paying}");
    for e in &mut examples {
        e.data = e.data.replace("\"pm_card_ok\"", &format!("\"{card}\""));
    }
    let mut extra = Vec::new();
    for prefix in ["WALLET", "SUBSCRIPTION"] {
        for (key, value) in [
            ("PAYMENT_PROVIDER", "stripe"),
            ("STRIPE_API_BASE", url.as_str()),
            (
                "STRIPE_SECRET_KEY",
                runtime::testing::localstripe::SECRET_KEY,
            ),
        ] {
            extra.push((format!("{prefix}_{key}"), value.to_string()));
        }
    }
    let suite = Suite::start_as_readme_with(
        runtime::testing::TestDatabase::fresh(),
        "dev-admin-token",
        &extra,
    )
    .await
    .unwrap();
    play(&suite, &examples).await;
    let customer = card.split(':').next().unwrap();
    let intents = runtime::testing::localstripe::payment_intents_of(&url, customer).await;
    let amounts: Vec<i64> = intents
        .iter()
        .map(|pi| {
            assert_eq!(pi["status"], "succeeded", "{pi}");
            pi["amount"].as_i64().unwrap()
        })
        .collect();
    // 50,000 credits for acme (420.00 EUR), the shop's first invoice, 50,000 credits for the
    // agency's wallet (420.00 EUR).
    assert_eq!(amounts.len(), 3, "{amounts:?}");
    assert_eq!(
        amounts.iter().filter(|a| **a == 42_000).count(),
        2,
        "{amounts:?}"
    );
    suite.stop().await.unwrap();
}
