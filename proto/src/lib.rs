//! Generated protobuf and gRPC code for the billing suite.
//!
//! The `.proto` files under `proto/billing/` are the contract between the services; nothing
//! else crosses a service boundary. [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection, so
//! grpcurl can list and call every RPC without the proto files.

#![allow(clippy::all, missing_docs)]

pub mod codec;

/// The encoded `FileDescriptorSet` of every proto file in the suite.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/billing_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("billing.common.v1");
    }
}

pub mod wallet {
    pub mod v1 {
        tonic::include_proto!("billing.wallet.v1");
    }
}

pub mod subscription {
    pub mod v1 {
        tonic::include_proto!("billing.subscription.v1");
    }
}

pub mod reseller {
    pub mod v1 {
        tonic::include_proto!("billing.reseller.v1");
    }
}
