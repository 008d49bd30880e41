//! Reading varco's cookies from a request and writing them back. A
//! malformed cookie is simply absent.

use http::header::{HeaderMap, HeaderValue, COOKIE};

/// The value of the first cookie called `name`, if well-formed.
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty() && v.len() <= 4096)
}

/// A Set-Cookie for one of varco's tokens: HttpOnly (scripts never need
/// it), SameSite=Lax (survives following a link into the portal), Secure
/// under TLS, Path=/ so every page of the room sees it.
pub fn set(name: &str, value: &str, max_age_secs: u64, secure: bool) -> HeaderValue {
    set_with(name, max_age_secs, secure, |out| out.push_str(value))
}

/// `set`, with the value written in place by `value` (a token signed
/// straight into the header: every new arrival gets one). A value that
/// is not a valid header gives a cookie that clears itself.
pub fn set_with(
    name: &str,
    max_age_secs: u64,
    secure: bool,
    value: impl FnOnce(&mut String),
) -> HeaderValue {
    let mut text = String::with_capacity(name.len() + 448);
    text.push_str(name);
    text.push('=');
    value(&mut text);
    text.push_str("; Path=/; Max-Age=");
    crate::timefmt::push_number(&mut text, max_age_secs);
    text.push_str("; HttpOnly; SameSite=Lax");
    if secure {
        text.push_str("; Secure");
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static("varco=; Max-Age=0"))
}

/// A Set-Cookie that deletes `name`.
pub fn clear(name: &str, secure: bool) -> HeaderValue {
    set(name, "", 0, secure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cookies_and_ignores_garbage() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            "a=1; varco_ticket_portal=abc.def.ghi; b".parse().unwrap(),
        );
        h.append(COOKIE, "c=3".parse().unwrap());
        assert_eq!(get(&h, "varco_ticket_portal"), Some("abc.def.ghi"));
        assert_eq!(get(&h, "c"), Some("3"));
        assert_eq!(get(&h, "b"), None);
        assert_eq!(get(&h, "missing"), None);
        let c = set("x", "v", 60, true);
        assert_eq!(c, "x=v; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure");
        let c = clear("x", false);
        assert_eq!(c, "x=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax");
    }
}
