//! Portcullis: the edge gateway for multi-tenant LLM inference.
//!
//! Modules follow a request's path (docs/ARCHITECTURE.md): [`connection`]
//! limits, then [`pipeline`] runs [`inbound`] sanity checks, [`identity`],
//! [`authz`] against the [`route`] table, [`limits`], [`body`] (with its
//! [`guardrails`]) and [`policy`]; [`forward`] sends the request to the
//! router and [`response`] reads its answer. [`config`] builds the snapshot they all read,
//! [`observe`] records what happened, and [`proxy`] wires it into Pingora's
//! hooks.

pub mod admin;
pub mod authz;
pub mod body;
pub mod config;
pub mod connection;
pub mod demo;
pub mod dev;
pub mod diag;
pub mod forward;
pub mod guardrails;
pub mod http_client;
pub mod identity;
pub mod ids;
pub mod inbound;
pub mod limits;
pub mod mock_router;
pub mod observe;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod reject;
pub mod response;
pub mod route;
pub mod server;
pub mod tenant;
