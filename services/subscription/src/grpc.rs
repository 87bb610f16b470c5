//! `subscription.v1.Subscriptions` over the runtime: message conversion and error mapping only.

use proto::common::v1::{Event, WatchEventsRequest};
use runtime::Platform;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The gRPC face of the service.
pub struct SubscriptionsApi {
    platform: Platform,
}

impl SubscriptionsApi {
    /// Serves on `platform`.
    pub fn new(platform: Platform) -> Self {
        Self { platform }
    }
}

#[tonic::async_trait]
impl proto::subscription::v1::subscriptions_server::Subscriptions for SubscriptionsApi {
    type WatchEventsStream = ReceiverStream<Result<Event, Status>>;

    #[tracing::instrument(skip_all, fields(after = req.get_ref().after_cursor))]
    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Ok(Response::new(
            self.platform
                .outbox
                .watch(req.into_inner(), self.platform.shutdown.clone()),
        ))
    }
}
