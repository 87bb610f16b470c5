//! The plan catalog: versions, listing, scopes, validation (S3, S4).

use proto::subscription::v1 as pb;
use runtime::testing::{ADMIN_TOKEN, MUTATE_TOKEN, READ_TOKEN, authed};
use tonic::Code;

use crate::{Harness, plan_spec};

// rule S3
// rule S4
#[tokio::test]
async fn s3_s4_publishing_again_makes_a_new_version_and_subscriptions_keep_theirs() {
    let h = Harness::start().await;
    let v1 = h.publish(plan_spec("email")).await;
    assert_eq!(v1.version, 1);
    let sub = h
        .subscribe("a1", "email", 5_000, crate::card("pm_card_ok"))
        .await
        .unwrap();
    assert_eq!(sub.plan_version, 1);
    let mut spec = plan_spec("email");
    spec.seat_price = "7".into();
    let v2 = h.publish(spec).await;
    assert_eq!(v2.version, 2);
    assert_eq!(
        h.get("a1").await.plan_version,
        1,
        "the subscription keeps its version"
    );

    let mut cat = h.catalog.clone();
    let latest = cat
        .get_plan(authed(
            READ_TOKEN,
            pb::GetPlanRequest {
                plan_id: "email".into(),
                version: 0,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.version, 2);
    assert_eq!(latest.spec.unwrap().seat_price, "7");
    let first = cat
        .get_plan(authed(
            READ_TOKEN,
            pb::GetPlanRequest {
                plan_id: "email".into(),
                version: 1,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.spec.unwrap().seat_price, "5");

    let mut sales = plan_spec("sales");
    sales.product = pb::Product::Sales as i32;
    h.publish(sales).await;
    let all = cat
        .list_plans(authed(
            READ_TOKEN,
            pb::ListPlansRequest {
                product: 0,
                all_versions: false,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .plans;
    assert_eq!(all.len(), 2);
    let every = cat
        .list_plans(authed(
            READ_TOKEN,
            pb::ListPlansRequest {
                product: 0,
                all_versions: true,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .plans;
    assert_eq!(every.len(), 3);
    let only_sales = cat
        .list_plans(authed(
            READ_TOKEN,
            pb::ListPlansRequest {
                product: pb::Product::Sales as i32,
                all_versions: false,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .plans;
    assert_eq!(only_sales.len(), 1);
}

#[tokio::test]
async fn publishing_needs_admin_and_a_valid_plan() {
    let h = Harness::start().await;
    let mut cat = h.catalog.clone();
    let denied = cat
        .publish_plan(authed(
            MUTATE_TOKEN,
            pb::PublishPlanRequest {
                idempotency_key: "p1".into(),
                plan: Some(plan_spec("x")),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut bad = plan_spec("x");
    bad.slider = Some(pb::Slider {
        min: 1_000,
        max: 50_500,
        step: 1_000,
    });
    let err = cat
        .publish_plan(authed(
            ADMIN_TOKEN,
            pb::PublishPlanRequest {
                idempotency_key: "p2".into(),
                plan: Some(bad),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut gap = plan_spec("x");
    gap.contact_tiers.as_mut().unwrap().tiers[1].first = 10_005;
    let err = cat
        .publish_plan(authed(
            ADMIN_TOKEN,
            pb::PublishPlanRequest {
                idempotency_key: "p3".into(),
                plan: Some(gap),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Same key, same request: the first answer again, no second version.
    let req = pb::PublishPlanRequest {
        idempotency_key: "p4".into(),
        plan: Some(plan_spec("y")),
    };
    let a = cat
        .publish_plan(authed(ADMIN_TOKEN, req.clone()))
        .await
        .unwrap()
        .into_inner();
    let b = cat
        .publish_plan(authed(ADMIN_TOKEN, req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.version, b.version), (1, 1));
}
