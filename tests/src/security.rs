//! Every RPC of every service, found from the proto descriptors (so a new RPC is covered the
//! day it is added): it must be declared in its service's scope table, refuse a call without a
//! token (`UNAUTHENTICATED`) and with a token that lacks its scope (`PERMISSION_DENIED`), and
//! answer an empty request with a clear error rather than an internal one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use prost_reflect::DescriptorPool;
use runtime::{
    auth::Scope,
    testing::{ACT_FOR_USER_TOKEN, ADMIN_TOKEN, MUTATE_TOKEN, READ_TOKEN},
};
use tonic::{Code, transport::Channel};

use crate::{Suite, channel, readme::RawCodec};

async fn call_empty(channel: Channel, path: &str, streaming: bool, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(Vec::new());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path: http::uri::PathAndQuery = path.parse().unwrap();
    if streaming {
        match grpc.server_streaming(req, path, RawCodec).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    } else {
        match grpc.unary(req, path, RawCodec).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    }
}

/// A test token that lacks `scope`, if any does.
fn token_without(scope: Scope) -> Option<&'static str> {
    match scope {
        Scope::Read => None,
        Scope::Mutate => Some(READ_TOKEN),
        Scope::Admin | Scope::ActForUser => Some(MUTATE_TOKEN),
    }
}

fn token_with(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => READ_TOKEN,
        Scope::Mutate => MUTATE_TOKEN,
        Scope::Admin => ADMIN_TOKEN,
        Scope::ActForUser => ACT_FOR_USER_TOKEN,
    }
}

#[tokio::test]
async fn every_rpc_is_declared_authenticated_and_scoped() {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let suite = Suite::start().await.unwrap();
    let specs = [
        (&credits_wallet::SPEC, &suite.wallet),
        (&subscription::SPEC, &suite.subscription),
        (&reseller_billing::SPEC, &suite.reseller),
    ];
    let mut methods_checked = 0;
    for (spec, running) in specs {
        let scopes = (spec.scopes)();
        let declared: Vec<&str> = scopes.paths().map(|(p, _)| p).collect();
        let ch = channel(running).await.unwrap();
        for service_name in spec.grpc_services {
            let service = pool
                .get_service_by_name(service_name)
                .unwrap_or_else(|| panic!("{service_name} is not in the descriptors"));
            for method in service.methods() {
                let path = format!("/{service_name}/{}", method.name());
                assert!(
                    declared.contains(&path.as_str()),
                    "{path} has no scope in its service's scope table"
                );
                let required = scopes.required(&path);
                let streaming = method.is_server_streaming();
                assert_eq!(
                    call_empty(ch.clone(), &path, streaming, None).await,
                    Code::Unauthenticated,
                    "{path} without a token"
                );
                assert_eq!(
                    call_empty(ch.clone(), &path, streaming, Some("wrong-token-123")).await,
                    Code::Unauthenticated,
                    "{path} with an unknown token"
                );
                if let Some(weak) = token_without(required) {
                    assert_eq!(
                        call_empty(ch.clone(), &path, streaming, Some(weak)).await,
                        Code::PermissionDenied,
                        "{path} needs {required}"
                    );
                }
                let answered =
                    call_empty(ch.clone(), &path, streaming, Some(token_with(required))).await;
                assert!(
                    !matches!(
                        answered,
                        Code::Unauthenticated
                            | Code::Internal
                            | Code::Unknown
                            | Code::Unimplemented
                    ),
                    "{path} with an empty request answered {answered:?}"
                );
                methods_checked += 1;
            }
        }
    }
    assert!(
        methods_checked >= 50,
        "only {methods_checked} methods found"
    );
    suite.stop().await.unwrap();
}
