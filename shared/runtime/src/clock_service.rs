//! `billing.common.v1.TestClock`, registered by every service.

use proto::common::v1::{
    AdvanceTimeRequest, ClockTime, GetTimeRequest, test_clock_server::TestClock,
};
use tonic::{Request, Response, Status};

use crate::{clock::ServiceClock, convert};

/// The gRPC face of the [`ServiceClock`].
pub struct TestClockService {
    clock: ServiceClock,
}

impl TestClockService {
    /// Serves `clock`.
    pub fn new(clock: ServiceClock) -> Self {
        Self { clock }
    }

    fn answer(&self) -> ClockTime {
        ClockTime {
            now: Some(convert::timestamp(self.clock.now())),
            test_clock: self.clock.is_test(),
        }
    }
}

#[tonic::async_trait]
impl TestClock for TestClockService {
    #[tracing::instrument(skip_all)]
    async fn get_time(&self, _req: Request<GetTimeRequest>) -> Result<Response<ClockTime>, Status> {
        Ok(Response::new(self.answer()))
    }

    #[tracing::instrument(skip_all)]
    async fn advance_time(
        &self,
        req: Request<AdvanceTimeRequest>,
    ) -> Result<Response<ClockTime>, Status> {
        let to = convert::required_instant(req.get_ref().to.as_ref(), "to")?;
        if !self.clock.is_test() {
            return Err(Status::failed_precondition(
                crate::clock::ClockError::NotTestClock.to_string(),
            ));
        }
        self.clock
            .advance_to(to)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(%to, "test clock advanced");
        Ok(Response::new(self.answer()))
    }
}
