# Portcullis authorization policy (Rego v1, evaluated in process by regorus).
#
# The gateway evaluates `data.portcullis.authz.result` after the body stage
# (model and features are known) and before any quota is reserved:
#
#   result.deny     set of {"code", "message"}; any entry denies with 403 and
#                   the lowest code (codes match [a-z][a-z0-9_]*)
#   result.headers  object of extra headers for the router on an allow;
#                   names must start with x-tenant-policy- (they are signed)
#
# An evaluation error, a timeout ([policy] rego_timeout_ms) or a malformed
# result denies with 403 policy_error. The input document is described in
# README.md ("Policies"). Edit and save: the gateway reloads it; a file that
# does not compile leaves the previous policy in force.
package portcullis.authz

import rego.v1

result := {"deny": deny, "headers": headers}

# Tenants of these orgs may use tools only from these gateway regions.
tools_regions := {"globex-inc": {"eu-west-1"}}

deny contains {
	"code": "tools_region_restricted",
	"message": sprintf("tools are available to %s only in %s", [input.tenant.org, concat(", ", sort(tools_regions[input.tenant.org]))]),
} if {
	"tools" in input.request.features
	allowed := tools_regions[input.tenant.org]
	not input.request.region in allowed
}

# No 70b model for the free plan during business hours (09:00-17:00 UTC).
deny contains {
	"code": "model_outside_hours",
	"message": "70b models are not available on the free plan between 09:00 and 17:00 UTC",
} if {
	input.tenant.plan == "free"
	contains(input.request.model, "70b")
	[hour, _, _] := time.clock([input.time.unix_ns, "UTC"])
	hour >= 9
	hour < 17
}

# A JWT must carry the inference:write scope (OAuth `scope` string or `scp` list).
deny contains {
	"code": "missing_scope",
	"message": "the token lacks the inference:write scope",
} if {
	input.identity.kind == "jwt"
	not "inference:write" in scopes
}

scopes contains s if {
	is_string(input.identity.claims.scope)
	some s in split(input.identity.claims.scope, " ")
}

scopes contains s if {
	is_array(input.identity.claims.scp)
	some s in input.identity.claims.scp
}

# Tell the router which requests may be queued behind paying traffic.
default headers := {}

headers := {"x-tenant-policy-priority": "low"} if input.tenant.plan == "free"
