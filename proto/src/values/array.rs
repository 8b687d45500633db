//! Postgres array output (`{…}` with optional `[l:u]=` bounds) into
//! [`v1::Array`]; elements go through [`super::decode_scalar`].

use crate::v1;

use super::TypeCategory;
use super::{Parsed, decode_scalar, null};

/// Postgres allows at most 6 array dimensions (MAXDIM).
const MAX_ARRAY_DIMS: usize = 6;

/// Array output syntax: optional `[l:u][l:u]=` bounds, nested braces, elements
/// separated by `delimiter`, quoted elements with backslash escapes, unquoted
/// `NULL` as SQL NULL.
pub(super) fn decode_array(category: TypeCategory, delimiter: u8, text: &str) -> Parsed<v1::Array> {
    let (bounds, body) = parse_bounds(text)?;
    let parsed = parse_array_body(body, delimiter)?;
    let ndims = parsed.dims.len();
    let lower_bounds = match bounds {
        None => vec![1; ndims],
        Some(bounds) => {
            if bounds.len() != ndims {
                return Err("array bounds do not match its dimensions");
            }
            for (&(lower, upper), &len) in bounds.iter().zip(&parsed.dims) {
                if i64::from(upper) - i64::from(lower) + 1 != i64::from(len) {
                    return Err("array bounds do not match its length");
                }
            }
            bounds.iter().map(|&(l, _)| l).collect()
        }
    };
    let elements = parsed
        .elements
        .into_iter()
        .map(|e| match e {
            None => Ok(null()),
            Some(s) => decode_scalar(category, &s).map(|k| v1::Value { kind: Some(k) }),
        })
        .collect::<Parsed<Vec<_>>>()?;
    Ok(v1::Array {
        dims: parsed.dims,
        lower_bounds,
        elements,
    })
}

/// A leading `[l:u]...=` decoration, if any, and the rest.
#[allow(clippy::type_complexity)]
fn parse_bounds(text: &str) -> Parsed<(Option<Vec<(i32, i32)>>, &str)> {
    if !text.starts_with('[') {
        return Ok((None, text));
    }
    let (decoration, body) = text.split_once('=').ok_or("array bounds without '='")?;
    let mut bounds = Vec::new();
    let mut rest = decoration;
    while let Some(r) = rest.strip_prefix('[') {
        let (dim, r) = r.split_once(']').ok_or("unterminated array bound")?;
        let (l, u) = dim.split_once(':').ok_or("array bound without ':'")?;
        let l: i32 = l.parse().map_err(|_| "bad array lower bound")?;
        let u: i32 = u.parse().map_err(|_| "bad array upper bound")?;
        bounds.push((l, u));
        if bounds.len() > MAX_ARRAY_DIMS {
            return Err("array has too many dimensions");
        }
        rest = r;
    }
    if !rest.is_empty() {
        return Err("garbage in array bounds");
    }
    Ok((Some(bounds), body))
}

struct ParsedArray {
    dims: Vec<u32>,
    /// Row-major; `None` is NULL.
    elements: Vec<Option<String>>,
}

/// Iterative (no recursion on untrusted nesting) parser of the brace part.
fn parse_array_body(text: &str, delimiter: u8) -> Parsed<ParsedArray> {
    let b = text.as_bytes();
    if b.first() != Some(&b'{') {
        return Err("array does not start with '{'");
    }
    if text == "{}" {
        return Ok(ParsedArray {
            dims: Vec::new(),
            elements: Vec::new(),
        });
    }
    // Per open level: elements counted so far. dims[level] fixed by the first
    // closing brace of that level; leaf_depth fixed by the first element.
    let mut counts: Vec<u32> = Vec::new();
    let mut dims: Vec<Option<u32>> = Vec::new();
    let mut leaf_depth: Option<usize> = None;
    let mut elements = Vec::new();
    let mut i = 0;
    // After '{' or a delimiter an item must follow; after an item or '}' a
    // delimiter or '}' must follow.
    let mut expect_item = true;
    let mut done = false;
    while i < b.len() {
        let c = b[i];
        if done {
            return Err("characters after the end of the array");
        }
        if c == b' ' || c == b'\t' || c == b'\n' || c == b'\r' {
            i += 1;
            continue;
        }
        if c == b'{' {
            if !expect_item {
                return Err("missing delimiter in array");
            }
            if let Some(parent) = counts.last_mut() {
                *parent += 1;
            }
            counts.push(0);
            if counts.len() > MAX_ARRAY_DIMS {
                return Err("array has too many dimensions");
            }
            if dims.len() < counts.len() {
                dims.push(None);
            }
            if leaf_depth.is_some_and(|d| counts.len() > d) {
                return Err("array is not rectangular");
            }
            i += 1;
            continue;
        }
        if c == b'}' {
            let level = counts
                .len()
                .checked_sub(1)
                .ok_or("unbalanced '}' in array")?;
            let n = counts.pop().ok_or("unbalanced '}' in array")?;
            // An empty inner level or a trailing delimiter is malformed.
            if expect_item {
                return Err("empty element or sub-array in array");
            }
            match dims[level] {
                None => dims[level] = Some(n),
                Some(d) if d == n => {}
                Some(_) => return Err("array is not rectangular"),
            }
            expect_item = false;
            done = counts.is_empty();
            i += 1;
            continue;
        }
        if c == delimiter {
            if expect_item || counts.is_empty() {
                return Err("misplaced delimiter in array");
            }
            expect_item = true;
            i += 1;
            continue;
        }
        // An element.
        if !expect_item || counts.is_empty() {
            return Err("missing delimiter in array");
        }
        let depth = counts.len();
        match leaf_depth {
            None => leaf_depth = Some(depth),
            Some(d) if d == depth => {}
            Some(_) => return Err("array is not rectangular"),
        }
        let (element, next) = parse_element(b, i, delimiter)?;
        elements.push(element);
        if let Some(last) = counts.last_mut() {
            *last += 1;
        }
        expect_item = false;
        i = next;
    }
    if !done {
        return Err("unterminated array");
    }
    let dims = dims
        .into_iter()
        .map(|d| d.ok_or("unterminated array"))
        .collect::<Parsed<Vec<u32>>>()?;
    if leaf_depth != Some(dims.len()) {
        return Err("array is not rectangular");
    }
    Ok(ParsedArray { dims, elements })
}

/// One element starting at `start`; returns it (None for unquoted NULL) and
/// the index after it. Splits only at ASCII bytes, so UTF-8 stays intact.
fn parse_element(b: &[u8], start: usize, delimiter: u8) -> Parsed<(Option<String>, usize)> {
    let mut out = Vec::new();
    let mut i = start;
    if b[i] == b'"' {
        i += 1;
        loop {
            match b.get(i) {
                None => return Err("unterminated quoted array element"),
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(b'\\') => {
                    out.push(*b.get(i + 1).ok_or("unterminated escape in array")?);
                    i += 2;
                }
                Some(&c) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        let s = String::from_utf8(out).map_err(|_| "invalid UTF-8 in array element")?;
        return Ok((Some(s), i));
    }
    let mut trailing_space = 0;
    while let Some(&c) = b.get(i) {
        if c == delimiter || c == b'}' {
            break;
        }
        match c {
            b'{' | b'"' => return Err("unexpected character in unquoted array element"),
            b'\\' => {
                out.push(*b.get(i + 1).ok_or("unterminated escape in array")?);
                trailing_space = 0;
                i += 2;
                continue;
            }
            b' ' | b'\t' | b'\n' | b'\r' => trailing_space += 1,
            _ => trailing_space = 0,
        }
        out.push(c);
        i += 1;
    }
    out.truncate(out.len() - trailing_space);
    let s = String::from_utf8(out).map_err(|_| "invalid UTF-8 in array element")?;
    if s.eq_ignore_ascii_case("NULL") {
        Ok((None, i))
    } else {
        Ok((Some(s), i))
    }
}
