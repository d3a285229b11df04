//! The OpenAPI 3.1 description of the broker's HTTP API, served at `/openapi.json`.
//!
//! Hand-written and kept next to the routes; the WebSocket endpoints are described by their
//! upgrade and point at the JSON message set documented in `steelyard_proto::api`.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn json_ok(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "type": "object" } } } })
}

fn admin(summary: &str, ok: &str) -> Value {
    json!({
        "summary": summary,
        "security": [ { "admin": [] } ],
        "responses": {
            "200": json_ok(ok),
            "401": error_response("missing or wrong admin token"),
            "403": error_response("admin API disabled (no admin_token configured)")
        }
    })
}

/// The document.
pub fn document() -> Value {
    let ws = |who: &str| {
        json!({
            "get": {
                "summary": format!("WebSocket for {who}: hello, challenge, auth, then messages (see steelyard_proto::api)"),
                "responses": {
                    "101": { "description": "switching to the WebSocket protocol" },
                    "400": error_response("not a WebSocket upgrade"),
                    "426": error_response("a WebSocket version other than 13"),
                    "429": error_response("too many unauthenticated connections from this address"),
                    "503": error_response("limits.max_connections WebSockets are open; retry after Retry-After seconds")
                }
            }
        })
    };
    let mut drain = admin(
        "Drain (or with draining=false undrain) a relay",
        "the relay's new state",
    );
    drain["parameters"] = json!([
        { "name": "id", "in": "path", "required": true, "schema": { "type": "string" } },
        { "name": "draining", "in": "query", "schema": { "type": "boolean", "default": true } }
    ]);
    drain["responses"]["404"] = error_response("no such relay");
    let mut revoke = admin(
        "Revoke a peer: refused from now on, its connection closed",
        "the revoked id",
    );
    revoke["parameters"] =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    revoke["responses"]["404"] = error_response("no such peer");
    let mut sessions = admin(
        "Live sessions and session history, newest first",
        "live, history, history_total",
    );
    sessions["parameters"] = json!([{ "name": "limit", "in": "query", "schema": { "type": "integer", "default": 100, "maximum": 10000 } }]);
    let mut put_policy = admin(
        "Replace the selection policy (validated, persisted)",
        "the policy in force",
    );
    put_policy["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "type": "object" } } } });
    put_policy["responses"]["400"] = error_response("invalid policy: the message names the field");
    let mut explain = admin(
        "Decide from->to without creating a session: every candidate's inputs and score parts",
        "the decision",
    );
    explain["parameters"] = json!([
        { "name": "from", "in": "query", "required": true, "schema": { "type": "string" } },
        { "name": "to", "in": "query", "required": true, "schema": { "type": "string" } },
        { "name": "transport", "in": "query", "schema": { "type": "string", "enum": ["tcp", "udp"] } }
    ]);
    explain["responses"]["422"] = error_response("no relay can be chosen; detail says why");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Steelyard broker",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Registry, scheduled reports and connection brokering with signed tickets."
        },
        "components": {
            "securitySchemes": { "admin": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": { "type": "string", "enum": crate::metrics::CODES.iter().map(|c| c.as_str()).collect::<Vec<_>>() },
                        "message": { "type": "string" },
                        "request_id": { "type": "integer" }
                    }
                }
            }
        },
        "paths": {
            "/v1/agent": ws("agents"),
            "/v1/relay": ws("relays"),
            "/v1/keys": { "get": { "summary": "The broker's ticket-signing public keys (relays trust these)", "responses": { "200": json_ok("keys: [{key_id, public_key, algorithm}]") } } },
            "/v1/health": { "get": { "summary": "Liveness and counts", "responses": { "200": json_ok("status and gauges") } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "responses": { "200": { "description": "text format 0.0.4" } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": json_ok("OpenAPI 3.1") } } },
            "/v1/explain": { "get": explain },
            "/v1/admin/peers": { "get": admin("Enrolled peers: identity, online, report age, paths", "peers") },
            "/v1/admin/peers/{id}/revoke": { "post": revoke },
            "/v1/admin/relays": { "get": admin("Relays: record, online, last load, health, draining", "relays") },
            "/v1/admin/relays/{id}/drain": { "post": drain },
            "/v1/admin/sessions": { "get": sessions },
            "/v1/admin/policy": {
                "get": admin("The selection policy in force", "the policy"),
                "put": put_policy
            }
        }
    })
}
