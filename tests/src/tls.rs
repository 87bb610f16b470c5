//! Optional TLS: with `tls_cert_path` and `tls_key_path` a service serves gRPC over TLS only;
//! a client that trusts the signing CA gets in, a plaintext client and a client trusting
//! another CA do not, and a service calling it as an `https://` peer (with the peer's
//! `ca_path`) works. The certificates are made by the test (rcgen): a CA, a server
//! certificate for 127.0.0.1 and localhost signed by it, and an unrelated CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use proto::{
    reseller::v1::{self as rpb, reseller_billing_client::ResellerBillingClient},
    wallet::v1::{self as wpb, credits_wallet_client::CreditsWalletClient},
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use runtime::{
    config::TlsConfig,
    testing::{self, ADMIN_TOKEN, TestDatabase, authed},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A CA: its certificate (PEM) and what it takes to sign with it.
struct Ca {
    pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        cert,
        key,
    }
}

/// A server certificate for 127.0.0.1 and localhost signed by `ca`: (cert PEM, key PEM).
fn server_cert(ca: &Ca) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(DnType::CommonName, "credits-wallet");
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn tls_channel(addr: std::net::SocketAddr, ca_pem: &str) -> Result<Channel, String> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_tls_service_admits_only_clients_that_trust_its_ca_and_serves_https_peers() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = ca("billing test CA");
    let other = ca("some other CA");
    let (cert_pem, key_pem) = server_cert(&trusted);
    let tls = TlsConfig {
        cert_path: write(dir.path(), "wallet.pem", &cert_pem),
        key_path: write(dir.path(), "wallet.key", &key_pem),
    };
    let ca_path = write(dir.path(), "ca.pem", &trusted.pem);

    let db = TestDatabase::fresh();
    let mut config = testing::config(&credits_wallet::DEFAULTS, &db.sibling("wallet"));
    config.tls = Some(tls);
    let wallet = runtime::server::start(&credits_wallet::SPEC, config, credits_wallet::routes)
        .await
        .unwrap();

    // A client that trusts the CA: health and a business call over TLS.
    let channel = tls_channel(wallet.addr, &trusted.pem).await.unwrap();
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let mut client = CreditsWalletClient::new(channel);
    client
        .open_wallet(authed(
            ADMIN_TOKEN,
            wpb::OpenWalletRequest {
                idempotency_key: "open".into(),
                wallet_id: "w-tls".into(),
                currency: "EUR".into(),
                pricing: Some(wpb::CreditPricing {
                    mode: wpb::TierMode::Volume as i32,
                    tiers: vec![wpb::PriceTier {
                        first: 1,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    }],
                }),
                rating: Some(wpb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
                signup_credits: 0,
                signup_credits_expire_at: None,
            },
        ))
        .await
        .unwrap();

    // A client that trusts another CA never gets a connection.
    let refused = tls_channel(wallet.addr, &other.pem).await;
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA was accepted"
    );

    // A plaintext client gets no answer from the TLS port.
    let plain = match Channel::from_shared(format!("http://{}", wallet.addr))
        .unwrap()
        .connect()
        .await
    {
        Ok(ch) => HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
        Err(e) => Err(format!("{e:?}")),
    };
    assert!(
        plain.is_err(),
        "plaintext HTTP/2 was served on the TLS port"
    );

    // reseller-billing calls the wallet as an https:// peer trusting the CA: registering a
    // partner opens the partner's wallet there.
    let peer = format!(
        "[peers.wallet]\nurl = \"https://{}\"\ntoken = \"{ADMIN_TOKEN}\"\nca_path = \"{}\"\n",
        wallet.addr,
        ca_path.display()
    );
    let reseller = runtime::server::start(
        &reseller_billing::SPEC,
        testing::config_with(&reseller_billing::DEFAULTS, &db.sibling("reseller"), &peer),
        reseller_billing::routes,
    )
    .await
    .unwrap();
    let mut partners = ResellerBillingClient::new(crate::channel(&reseller).await.unwrap());
    partners
        .register_partner(authed(
            ADMIN_TOKEN,
            rpb::RegisterPartnerRequest {
                idempotency_key: "partner".into(),
                partner_id: "p-tls".into(),
                currency: "EUR".into(),
                funding: rpb::PartnerFunding::Prepaid as i32,
                payment_method: String::new(),
                pricing: Some(wpb::CreditPricing {
                    mode: wpb::TierMode::Volume as i32,
                    tiers: vec![wpb::PriceTier {
                        first: 1,
                        last: 0,
                        unit_price: "0.01".into(),
                        flat_price: String::new(),
                    }],
                }),
                rating: Some(wpb::RatingRule {
                    credits_per_recipient: "1".into(),
                    per_mailing_surcharge: 0,
                }),
            },
        ))
        .await
        .unwrap();
    let partner_wallet = client
        .get_wallet(authed(
            ADMIN_TOKEN,
            wpb::GetWalletRequest {
                wallet_id: "partner:p-tls".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(partner_wallet.currency, "EUR");

    reseller.stop().await.unwrap();
    wallet.stop().await.unwrap();
}

#[tokio::test]
async fn an_unusable_certificate_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::fresh();
    let mut config = testing::config(&credits_wallet::DEFAULTS, &db);
    config.tls = Some(TlsConfig {
        cert_path: write(dir.path(), "wallet.pem", "not a certificate"),
        key_path: write(dir.path(), "wallet.key", "not a key"),
    });
    let err = runtime::server::start(&credits_wallet::SPEC, config, credits_wallet::routes)
        .await
        .err()
        .expect("a bad certificate, no start");
    assert!(format!("{err:#}").contains("wallet.pem"), "{err:#}");
}

#[tokio::test]
async fn a_missing_certificate_stops_the_start_with_its_path() {
    let db = TestDatabase::fresh();
    let mut config = testing::config(&credits_wallet::DEFAULTS, &db);
    config.tls = Some(TlsConfig {
        cert_path: "/nonexistent/wallet.pem".into(),
        key_path: "/nonexistent/wallet.key".into(),
    });
    let err = runtime::server::start(&credits_wallet::SPEC, config, credits_wallet::routes)
        .await
        .err()
        .expect("no certificate, no start");
    assert!(
        format!("{err:#}").contains("/nonexistent/wallet.pem"),
        "{err:#}"
    );
}
