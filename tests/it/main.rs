//! All integration tests in one binary: one link instead of one per file
//! keeps a clean build fast and small. Each module is one feature area.

mod common;

mod access_log;
mod adversarial;
mod api_surface;
mod body;
mod body_budget;
mod body_corpus;
mod cli;
mod dashboards;
mod edge;
mod gateway;
mod guardrails;
mod jwks_url;
mod keys;
mod limits;
mod policy;
mod quotas;
mod redis_limits;
mod reload;
mod replicas;
mod routes;
mod sdk;
mod slow_clients;
mod telemetry;
mod tls;
mod token_estimate;
mod upgrade;
mod upstream_tls;
