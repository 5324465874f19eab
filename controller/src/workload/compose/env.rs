//! What Compose does where it runs, done here: interpolation (`$$`,
//! `${VAR:-default}`; variables themselves are never read: the controller
//! has no shell), env files inlined by the CLI, and warnings for what a
//! Compose user expects read and is not.

use super::*;

/// Compose's interpolation in every string value: `$$` is a literal `$`,
/// `${VAR:-default}` and `${VAR-default}` take the default. A variable
/// without a default comes from the shell where Compose runs, which the
/// controller does not have: refused, naming it.
pub(super) fn interpolate_all(v: &mut Value, field: &str) -> Checked<()> {
    match v {
        Value::String(s) => *s = interpolate(s).map_err(|m| FieldError { field: field.to_string(), message: m })?,
        Value::Sequence(seq) => {
            for (i, item) in seq.iter_mut().enumerate() {
                interpolate_all(item, &format!("{field}[{i}]"))?;
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                let k = k.as_str().unwrap_or("?");
                let at = if field.is_empty() { k.to_string() } else { format!("{field}.{k}") };
                interpolate_all(item, &at)?;
            }
        }
        _ => {}
    }
    Ok(())
}

pub fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = matching_brace(r).ok_or_else(|| format!("{s:?}: unterminated ${{"))?;
            out.push_str(&unset_variable(&r[..end])?);
            rest = &r[end + 1..];
        } else {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.is_empty() {
                out.push('$');
            } else {
                return Err(format!(
                    "${name} is read from the shell where Compose runs, which Baton does not have: write the value (or $$ for a literal $)"
                ));
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Where the `}` closing a `${` is (defaults may hold `${…}` themselves).
pub(super) fn matching_brace(r: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in r.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// What `${expr}` is with its variable unset, as it always is here: the
/// default of `:-` / `-`, nothing for `:+` / `+`, a refusal for `:?` / `?`
/// and for a bare variable.
pub(super) fn unset_variable(expr: &str) -> Result<String, String> {
    let len = expr.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len());
    let (name, op) = expr.split_at(len);
    if name.is_empty() {
        return Err(format!("${{{expr}}}: expected ${{NAME}}, ${{NAME:-DEFAULT}} or $$"));
    }
    let shell = "is read from the shell where Compose runs, which Baton does not have";
    if op.is_empty() {
        return Err(format!("${{{name}}} {shell}: write the value, or ${{{name}:-DEFAULT}}"));
    }
    if let Some(default) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
        return interpolate(default);
    }
    if op.starts_with(":+") || op.starts_with('+') {
        return Ok(String::new());
    }
    if let Some(message) = op.strip_prefix(":?").or_else(|| op.strip_prefix('?')) {
        return Err(format!("${{{name}}} must be set ({message}); it {shell}: write the value"));
    }
    Err(format!("${{{expr}}}: use ${{{name}}}, ${{{name}:-DEFAULT}}, ${{{name}:+VALUE}} or ${{{name}:?MESSAGE}}"))
}

/// Compose reads `env_file`s where it runs; so does `baton apply`: this
/// inlines each service's env files into its `environment` (which wins over
/// them, as in Compose; a later file over an earlier one). `read` gets each
/// path as written (the CLI resolves it against the Compose file's
/// directory). None when the text is not a Compose file with env files.
pub fn inline_env_files(text: &str, read: impl Fn(&str) -> Result<String, String>) -> Result<Option<String>, String> {
    let Ok(mut doc) = serde_yaml::from_str::<Value>(text) else { return Ok(None) };
    if !is_compose(&doc) {
        return Ok(None);
    }
    let Some(services) = doc.get_mut("services").and_then(Value::as_mapping_mut) else { return Ok(None) };
    let mut changed = false;
    for (name, svc) in services.iter_mut() {
        let name = name.as_str().unwrap_or("?").to_string();
        let Some(svc) = svc.as_mapping_mut() else { continue };
        let Some(files) = svc.remove("env_file") else { continue };
        changed = true;
        let paths: Vec<String> = match files {
            Value::String(p) => vec![p],
            Value::Sequence(seq) => seq
                .into_iter()
                .map(|v| match v {
                    Value::String(p) => Ok(p),
                    Value::Mapping(m) => match m.get("path").and_then(Value::as_str) {
                        Some(p) => Ok(p.to_string()),
                        None => Err(format!("services.{name}.env_file: an entry without a path")),
                    },
                    _ => Err(format!("services.{name}.env_file: a path or a list of paths")),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("services.{name}.env_file: a path or a list of paths")),
        };
        let mut env = Mapping::new();
        for path in &paths {
            let text = read(path).map_err(|e| format!("services.{name}.env_file: {path}: {e}"))?;
            for (k, v) in parse_env_file(&text).map_err(|e| format!("services.{name}.env_file: {path}: {e}"))? {
                env.insert(Value::String(k), Value::String(v));
            }
        }
        // What `environment` says wins.
        match svc.get("environment") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    env.insert(k.clone(), v.clone());
                }
            }
            Some(Value::Sequence(seq)) => {
                for item in seq {
                    let Some(s) = item.as_str() else { continue };
                    match s.split_once('=') {
                        Some((k, v)) => env.insert(Value::String(k.into()), Value::String(v.into())),
                        None => env.insert(Value::String(s.into()), Value::Null),
                    };
                }
            }
            Some(_) => return Err(format!("services.{name}.environment: a mapping or a list of KEY=VALUE")),
        }
        svc.insert(Value::String("environment".into()), Value::Mapping(env));
    }
    if !changed {
        return Ok(None);
    }
    serde_yaml::to_string(&doc).map(Some).map_err(|e| e.to_string())
}

/// What a Compose user may expect to be read and is not: a `.env` beside
/// the file, and variables set in the caller's shell that `${NAME…}` names
/// (Baton interpolates with defaults only). Warnings, one per cause.
pub fn unread_variables(text: &str, dot_env: bool, is_set: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(doc) = serde_yaml::from_str::<Value>(text) else { return Vec::new() };
    if !is_compose(&doc) {
        return Vec::new();
    }
    let mut out = Vec::new();
    if dot_env {
        out.push("a .env file is beside it: Baton does not read it for ${…} (values come from defaults only; env_file is read)".to_string());
    }
    let mut seen = std::collections::BTreeSet::new();
    for part in text.split("${").skip(1) {
        let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && is_set(&name) && seen.insert(name.clone()) {
            out.push(format!("${{{name}…}} takes its default: your shell's {name} is not read"));
        }
    }
    out
}

/// An env file: `KEY=VALUE` lines (an optional `export `, values optionally
/// in single or double quotes), blank lines and `#` comments.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: {line:?} takes its value from the shell; write KEY=VALUE", i + 1));
        };
        let v = v.trim();
        let v = match (v.chars().next(), v.chars().last()) {
            (Some('"'), Some('"')) | (Some('\''), Some('\'')) if v.len() >= 2 => &v[1..v.len() - 1],
            _ => v,
        };
        out.push((k.trim().to_string(), v.to_string()));
    }
    Ok(out)
}
