//! The body stage: read with a hard bound, parse strictly, validate, apply
//! the tenant's model and feature policy, estimate tokens, normalise.

pub mod strict_json;
pub mod tokens;
