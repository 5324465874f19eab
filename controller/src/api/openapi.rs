//! The OpenAPI 3 description of the HTTP API, made from the list the router
//! is built from (`super::operations`): each operation there names its
//! method, path, summary, and the Rust types of its query, body and answer,
//! and schemars derives their JSON Schemas from the types themselves (doc
//! comments become descriptions). Nothing here is written beside the code:
//! a route cannot exist without its entry, nor an entry without its route.

use axum::http::Method;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};

use serde_json::{json, Map, Value};

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// A request's or an answer's body.
#[derive(Clone, Copy)]
pub enum Body {
    None,
    /// JSON of a type.
    Json(SchemaFn),
    /// Anything else: its media type and what it is.
    Raw(&'static str, &'static str),
}

pub fn json<T: JsonSchema>() -> Body {
    Body::Json(|g| g.subschema_for::<T>())
}

/// What the description says of one operation.
pub struct Doc {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    /// The query string's fields, as the handler's `Query` type has them.
    pub query: Option<SchemaFn>,
    pub request: Body,
    pub response: Body,
}

impl Doc {
    pub fn at(method: Method, path: &'static str, summary: &'static str) -> Doc {
        Doc { method, path, summary, query: None, request: Body::None, response: Body::None }
    }

    /// Its query string is a `T`.
    pub fn query<T: JsonSchema>(mut self) -> Doc {
        self.query = Some(|g| g.root_schema_for::<T>());
        self
    }

    pub fn takes(mut self, body: Body) -> Doc {
        self.request = body;
        self
    }

    pub fn gives(mut self, body: Body) -> Doc {
        self.response = body;
        self
    }
}

/// Paths without a token: the rest need `Authorization: Bearer` under `--api-auth`.
pub fn public(path: &str) -> bool {
    matches!(path, "/healthz" | "/api/v1/openapi.json")
}

/// The whole description.
pub fn describe(docs: &[Doc]) -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut paths = Map::new();
    for d in docs {
        let mut op = Map::new();
        op.insert("summary".into(), d.summary.into());
        op.insert("operationId".into(), operation_id(&d.method, d.path).into());
        let mut params: Vec<Value> = d
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if let Some(q) = d.query {
            let schema = q(&mut generator);
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, s) in props {
                    let mut s = s.clone();
                    let description = s.as_object_mut().and_then(|o| o.remove("description"));
                    let mut p = json!({"name": name, "in": "query", "required": required.contains(&name.as_str()), "schema": s});
                    if let Some(text) = description {
                        p["description"] = text;
                    }
                    params.push(p);
                }
            }
        }
        if !params.is_empty() {
            op.insert("parameters".into(), params.into());
        }
        if let Some(content) = content(d.request, &mut generator) {
            op.insert("requestBody".into(), json!({"required": true, "content": content}));
        }
        let ok = match content(d.response, &mut generator) {
            Some(content) => json!({"description": "OK", "content": content}),
            None => json!({"description": "OK"}),
        };
        let error = json!({"description": "Refused: `{\"error\": \"…\"}` says why",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}});
        op.insert("responses".into(), json!({"200": ok, "default": error}));
        if public(d.path) {
            op.insert("security".into(), json!([]));
        }
        let entry = paths.entry(d.path.to_string()).or_insert_with(|| json!({}));
        entry[d.method.as_str().to_lowercase()] = Value::Object(op);
    }
    // Every error answer has this shape.
    generator.subschema_for::<crate::view::ApiError>();
    let mut schemas = Value::Object(generator.take_definitions(true));
    let mut paths = Value::Object(paths);
    any_as_object(&mut schemas);
    any_as_object(&mut paths);
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Baton controller API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of the Baton controller: what the `baton` CLI and the dashboard call.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                "description": "An API token (`baton apitoken create`); needed with `--api-auth`."}},
        },
        "security": [{"token": []}],
    })
}

/// What OpenAPI 3.0 says otherwise than JSON Schema: no boolean schemas
/// (`true`, anything: a `serde_json::Value`, is `{}`), and no tuples (a
/// pair's `items` list is one schema: the items' own when they agree, else
/// any of them).
fn any_as_object(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "items" {
                    if let Value::Array(each) = x {
                        let first = each.first().cloned().unwrap_or_else(|| json!({}));
                        *x = if each.iter().all(|e| *e == first) { first } else { json!({ "anyOf": each.clone() }) };
                    }
                }
                if matches!(k.as_str(), "schema" | "items") && *x == Value::Bool(true) {
                    *x = json!({});
                } else if k == "properties" {
                    for p in x.as_object_mut().into_iter().flat_map(|p| p.values_mut()) {
                        if *p == Value::Bool(true) {
                            *p = json!({});
                        }
                    }
                }
                any_as_object(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(any_as_object),
        _ => {}
    }
}

fn content(body: Body, generator: &mut SchemaGenerator) -> Option<Value> {
    match body {
        Body::None => None,
        Body::Json(schema) => Some(json!({"application/json": {"schema": schema(generator)}})),
        Body::Raw(media, what) => {
            Some(json!({ media: {"schema": {"type": "string", "format": "binary", "description": what}} }))
        }
    }
}

/// `get_api_v1_devices_id`: a stable name for code generators.
fn operation_id(method: &Method, path: &str) -> String {
    let mut id = method.as_str().to_lowercase();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        id.push('_');
        id.extend(part.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_'));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `v` names a schema in `schemas`.
    fn refs_resolve(v: &Value, schemas: &Map<String, Value>, missing: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                    let name = r.trim_start_matches("#/components/schemas/");
                    if !schemas.contains_key(name) {
                        missing.push(r.to_string());
                    }
                }
                o.values().for_each(|x| refs_resolve(x, schemas, missing));
            }
            Value::Array(a) => a.iter().for_each(|x| refs_resolve(x, schemas, missing)),
            _ => {}
        }
    }

    #[test]
    fn the_description_covers_every_operation_and_its_references_resolve() {
        let docs = crate::api::operation_docs();
        let spec = describe(&docs);
        let paths = spec["paths"].as_object().expect("paths");
        let operations: usize = paths.values().map(|p| p.as_object().map_or(0, |o| o.len())).sum();
        assert_eq!(operations, docs.len(), "an operation is missing or listed twice");
        let schemas = spec["components"]["schemas"].as_object().expect("schemas").clone();
        let mut missing = Vec::new();
        refs_resolve(&spec, &schemas, &mut missing);
        assert!(missing.is_empty(), "unresolved: {missing:?}");
        // Every `{param}` of a path is declared; ids are unique.
        let mut ids = std::collections::BTreeSet::new();
        for (path, ops) in paths {
            for (method, op) in ops.as_object().expect("operations") {
                assert!(ids.insert(op["operationId"].as_str().expect("id").to_string()), "{method} {path}");
                for name in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
                    let declared = op["parameters"].as_array().into_iter().flatten().any(|p| p["name"] == name);
                    assert!(declared, "{method} {path}: {name} undeclared");
                }
            }
        }
        // The types say what the fields are: a device's status is one of three words.
        let status = &schemas["Status"];
        assert!(status.to_string().contains("offline"), "{status}");
        let list = &paths["/api/v1/devices"]["get"];
        let names: Vec<&str> =
            list["parameters"].as_array().expect("query").iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(names.contains(&"limit") && names.contains(&"sort"), "{names:?}");
    }
}
