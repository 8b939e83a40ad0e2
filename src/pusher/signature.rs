//! Pusher's request signatures: the HMAC-SHA256 that signs REST API calls, exactly as the
//! official server SDKs compute it, and its verification.
//!
//! The string to sign is `METHOD\nPATH\nQUERY`, where QUERY is every query parameter except
//! `auth_signature`, keys lower-cased, sorted by key, joined as `key=value` with `&`, values
//! unescaped. A request with a body also signs the body's MD5 as `body_md5`.
//!
//! A [`Verifier`] keeps its scratch space (the parameters, the string to sign) from one call to
//! the next, and digests are compared as bytes on the stack, so verifying a steady stream of
//! signed calls allocates nothing.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

use super::App;

type HmacSha256 = Hmac<Sha256>;

/// How far a request's `auth_timestamp` may be from the server's clock, in seconds (Pusher's).
pub const MAX_CLOCK_SKEW_SECS: u64 = 600;

/// Why a signed request was refused. All of them answer 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A required `auth_*` parameter is absent.
    #[error("missing query parameter {0}")]
    Missing(&'static str),
    /// `auth_key` is not this app's key.
    #[error("unknown auth_key")]
    UnknownKey,
    /// `auth_version` is not `1.0`.
    #[error("unsupported auth_version {0:?}: expected 1.0")]
    Version(String),
    /// `auth_timestamp` is not a number, or too far from now.
    #[error("auth_timestamp {0:?} is not within {MAX_CLOCK_SKEW_SECS} s of the server's time")]
    Timestamp(String),
    /// `body_md5` does not match the body.
    #[error("body_md5 does not match the request body")]
    BodyMd5,
    /// The signature is not hex, or does not match.
    #[error("invalid auth_signature")]
    Signature,
}

/// HMAC-SHA256 of `message` under `secret`, as lower-case hex.
pub fn hmac_hex(secret: &str, message: &str) -> String {
    hex::encode(new_mac(secret, message).finalize().into_bytes())
}

/// Checks `signature` (hex) against HMAC-SHA256 of `message`, in constant time.
pub fn hmac_matches(secret: &str, message: &str, signature: &str) -> bool {
    // Decoded on the stack: a signature of any other length than SHA-256's cannot match.
    let mut expected = [0u8; 32];
    if hex::decode_to_slice(signature, &mut expected).is_err() {
        return false;
    }
    new_mac(secret, message).verify_slice(&expected).is_ok()
}

fn new_mac(secret: &str, message: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(message.as_bytes());
    mac
}

fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

fn string_to_sign(method: &str, path: &str, params: &mut [(String, String)]) -> String {
    params.sort_unstable();
    let mut signed = String::new();
    write_string_to_sign(&mut signed, method, path, params);
    signed
}

/// Writes the string to sign into `out` (emptied first), from parameters sorted by key.
fn write_string_to_sign(out: &mut String, method: &str, path: &str, sorted: &[(String, String)]) {
    out.clear();
    for part in [method, "\n", path, "\n"] {
        out.push_str(part);
    }
    for (i, (key, value)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        for part in [key.as_str(), "=", value.as_str()] {
            out.push_str(part);
        }
    }
}

/// The signed query string a Pusher server SDK would send for this request at `unix_now`.
/// Used by our tests and the load tool; the server only verifies.
pub fn sign_query(app: &App, method: &str, path: &str, body: &[u8], params: &[(&str, &str)], unix_now: u64) -> String {
    let mut all: Vec<(String, String)> =
        vec![("auth_key".into(), app.key.clone()), ("auth_timestamp".into(), unix_now.to_string()), ("auth_version".into(), "1.0".into())];
    if !body.is_empty() {
        all.push(("body_md5".into(), body_md5(body)));
    }
    all.extend(params.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())));
    let signature = hmac_hex(&app.secret, &string_to_sign(method, path, &mut all));
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &all {
        query.append_pair(k, v);
    }
    query.append_pair("auth_signature", &signature);
    query.finish()
}

/// The `auth` a server SDK's `authorizeChannel` returns for `socket_id` on `channel`:
/// `key:hex(HMAC-SHA256(secret, "socket_id:channel"))`, with `:channel_data` appended to the
/// signed string on presence channels. The server only verifies; tests and the load tool sign.
pub fn channel_auth(app: &App, socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    key_and_signature(app, &channel_string(socket_id, channel, channel_data))
}

/// Whether `auth` is this app's valid [`channel_auth`] (checked in constant time).
pub fn channel_auth_matches(app: &App, socket_id: &str, channel: &str, channel_data: Option<&str>, auth: &str) -> bool {
    key_and_signature_match(app, &channel_string(socket_id, channel, channel_data), auth)
}

fn channel_string(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// The `auth` a server SDK's `authenticateUser` returns: `key:hex(HMAC-SHA256(secret,
/// "socket_id::user::user_data"))`.
pub fn user_auth(app: &App, socket_id: &str, user_data: &str) -> String {
    key_and_signature(app, &user_string(socket_id, user_data))
}

/// Whether `auth` is this app's valid [`user_auth`] (checked in constant time).
pub fn user_auth_matches(app: &App, socket_id: &str, user_data: &str, auth: &str) -> bool {
    key_and_signature_match(app, &user_string(socket_id, user_data), auth)
}

fn user_string(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

/// `key:signature`, the form of every client-side `auth`.
fn key_and_signature(app: &App, message: &str) -> String {
    format!("{}:{}", app.key, hmac_hex(&app.secret, message))
}

fn key_and_signature_match(app: &App, message: &str, auth: &str) -> bool {
    let Some((key, signature)) = auth.split_once(':') else { return false };
    key == app.key && hmac_matches(&app.secret, message, signature)
}

/// Verifies REST requests' signatures, keeping its scratch space from one call to the next.
#[derive(Debug, Default)]
pub struct Verifier {
    /// The query's parameters but `auth_signature`, keys lower-cased: the first `len` pairs are
    /// this call's; the strings of the rest are kept for their capacity.
    params: Vec<(String, String)>,
    len: usize,
    /// `auth_signature`, if `signed`: the query has one.
    signature: String,
    signed: bool,
    message: String,
}

impl Verifier {
    /// Takes the query's parameters apart into the scratch space, overwriting what the last
    /// call left there.
    fn read_query(&mut self, query: &str) {
        self.len = 0;
        self.signed = false;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if k.eq_ignore_ascii_case("auth_signature") {
                self.signature.clear();
                self.signature.push_str(&v);
                self.signed = true;
                continue;
            }
            if self.len == self.params.len() {
                self.params.push(Default::default());
            }
            let (key, value) = &mut self.params[self.len];
            key.clear();
            key.push_str(&k);
            key.make_ascii_lowercase();
            value.clear();
            value.push_str(&v);
            self.len += 1;
        }
    }

    /// Verifies a REST request's signature: the key, version, timestamp, body MD5 and HMAC.
    pub fn verify(&mut self, app: &App, method: &str, path: &str, query: &str, body: &[u8], unix_now: u64) -> Result<(), AuthError> {
        self.read_query(query);
        let Verifier { params, len, signature, signed, message } = self;
        let params = &mut params[..*len];
        let param = |name: &'static str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());

        let key = param("auth_key").ok_or(AuthError::Missing("auth_key"))?;
        if key != app.key {
            return Err(AuthError::UnknownKey);
        }
        let version = param("auth_version").ok_or(AuthError::Missing("auth_version"))?;
        if version != "1.0" {
            return Err(AuthError::Version(version.chars().take(16).collect()));
        }
        let timestamp = param("auth_timestamp").ok_or(AuthError::Missing("auth_timestamp"))?;
        match timestamp.parse::<u64>() {
            Ok(t) if t.abs_diff(unix_now) <= MAX_CLOCK_SKEW_SECS => {}
            _ => return Err(AuthError::Timestamp(timestamp.chars().take(24).collect())),
        }
        if !body.is_empty() {
            let md5 = param("body_md5").ok_or(AuthError::Missing("body_md5"))?;
            // Compared as bytes: hex in either case decodes to the same digest.
            let mut given = [0u8; 16];
            if hex::decode_to_slice(md5, &mut given).is_err() || given[..] != Md5::digest(body)[..] {
                return Err(AuthError::BodyMd5);
            }
        }
        if !*signed {
            return Err(AuthError::Missing("auth_signature"));
        }
        // Unstable sorting never allocates; pairs that compare equal are identical anyway.
        params.sort_unstable();
        write_string_to_sign(message, method, path, params);
        if hmac_matches(&app.secret, message, signature) {
            Ok(())
        } else {
            Err(AuthError::Signature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App { id: "app-id".into(), key: "app-key".into(), secret: "app-secret".into(), subscription_count_events: false }
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn matches_the_example_in_pushers_documentation() {
        // From Pusher's "REST API: generating authentication signatures" worked example.
        let app = App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            subscription_count_events: false,
        };
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(body_md5(body), "ec365a775a4cd0599faeb73354201b6f");
        let mut params = vec![
            ("auth_key".to_string(), app.key.clone()),
            ("auth_timestamp".to_string(), "1353088179".to_string()),
            ("auth_version".to_string(), "1.0".to_string()),
            ("body_md5".to_string(), body_md5(body)),
        ];
        let signed = string_to_sign("POST", "/apps/3/events", &mut params);
        assert_eq!(hmac_hex(&app.secret, &signed), "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c");
    }

    #[test]
    fn a_signed_query_verifies() {
        let body = br#"{"name":"e","channels":["c"],"data":"{}"}"#;
        let query = sign_query(&app(), "POST", "/apps/app-id/events", body, &[], NOW);
        assert_eq!(Verifier::default().verify(&app(), "POST", "/apps/app-id/events", &query, body, NOW + 5), Ok(()));
        let query = sign_query(&app(), "GET", "/apps/app-id/channels", b"", &[("filter_by_prefix", "presence-")], NOW);
        assert_eq!(Verifier::default().verify(&app(), "GET", "/apps/app-id/channels", &query, b"", NOW), Ok(()));
    }

    #[test]
    fn a_reused_verifier_keeps_nothing_of_the_last_call() {
        let mut verifier = Verifier::default();
        let path = "/apps/app-id/channels";
        let with_info = sign_query(&app(), "GET", path, b"", &[("info", "subscription_count"), ("filter_by_prefix", "a")], NOW);
        let without = sign_query(&app(), "GET", path, b"", &[], NOW);
        let unsigned = without.split("&auth_signature=").next().expect("a signed query").to_string();
        assert_eq!(verifier.verify(&app(), "GET", path, &with_info, b"", NOW), Ok(()));
        assert_eq!(verifier.verify(&app(), "GET", path, &without, b"", NOW), Ok(()), "the first call's extra parameters are gone");
        assert_eq!(verifier.verify(&app(), "GET", path, &unsigned, b"", NOW), Err(AuthError::Missing("auth_signature")));
        assert_eq!(verifier.verify(&app(), "GET", path, &with_info, b"", NOW), Ok(()));
    }

    #[test]
    fn tampering_is_refused() {
        let body = br#"{"name":"e","channels":["c"],"data":"{}"}"#;
        let query = sign_query(&app(), "POST", "/apps/app-id/events", body, &[], NOW);
        assert_eq!(Verifier::default().verify(&app(), "POST", "/apps/app-id/events", &query, b"{}", NOW), Err(AuthError::BodyMd5));
        assert_eq!(Verifier::default().verify(&app(), "POST", "/apps/other/events", &query, body, NOW), Err(AuthError::Signature));
        assert_eq!(Verifier::default().verify(&app(), "GET", "/apps/app-id/events", &query, body, NOW), Err(AuthError::Signature));
        let wrong_secret = App { secret: "nope".into(), ..app() };
        let forged = sign_query(&wrong_secret, "POST", "/apps/app-id/events", body, &[], NOW);
        assert_eq!(Verifier::default().verify(&app(), "POST", "/apps/app-id/events", &forged, body, NOW), Err(AuthError::Signature));
        let added = format!("{query}&info=subscription_count");
        assert_eq!(Verifier::default().verify(&app(), "POST", "/apps/app-id/events", &added, body, NOW), Err(AuthError::Signature));
    }

    #[test]
    fn channel_and_user_auth_match_pushers_examples() {
        // Pusher's documented example app (key 278d425bdf160c739803, secret
        // 7ad3773142a6692b25b8, socket 1234.1234); the expected values are what the official
        // `pusher` npm SDK 5.3.4 returns from authorizeChannel and authenticateUser.
        let app = App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            subscription_count_events: false,
        };
        let private = channel_auth(&app, "1234.1234", "private-foobar", None);
        assert_eq!(private, "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4");
        assert!(channel_auth_matches(&app, "1234.1234", "private-foobar", None, &private));
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let presence = channel_auth(&app, "1234.1234", "presence-foobar", Some(data));
        assert_eq!(presence, "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80");
        assert!(channel_auth_matches(&app, "1234.1234", "presence-foobar", Some(data), &presence));
        // Wrong socket, channel, data, key or junk: refused.
        assert!(!channel_auth_matches(&app, "1234.1235", "private-foobar", None, &private));
        assert!(!channel_auth_matches(&app, "1234.1234", "private-other", None, &private));
        assert!(!channel_auth_matches(&app, "1234.1234", "presence-foobar", Some("{}"), &presence));
        assert!(!channel_auth_matches(&app, "1234.1234", "private-foobar", None, &private.replacen("278d", "378d", 1)));
        for junk in ["", ":", "no-colon", "278d425bdf160c739803:zz"] {
            assert!(!channel_auth_matches(&app, "1234.1234", "private-foobar", None, junk), "{junk:?}");
        }
        let user = user_auth(&app, "1234.1234", r#"{"id":"12345"}"#);
        assert_eq!(user, "278d425bdf160c739803:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba");
        assert!(user_auth_matches(&app, "1234.1234", r#"{"id":"12345"}"#, &user));
        assert!(!user_auth_matches(&app, "1234.1234", r#"{"id":"1"}"#, &user));
    }

    #[test]
    fn stale_timestamps_keys_and_versions_are_refused() {
        let query = sign_query(&app(), "GET", "/apps/app-id/channels", b"", &[], NOW);
        assert!(matches!(
            Verifier::default().verify(&app(), "GET", "/apps/app-id/channels", &query, b"", NOW + 601),
            Err(AuthError::Timestamp(_))
        ));
        assert!(matches!(
            Verifier::default().verify(&app(), "GET", "/apps/app-id/channels", &query, b"", NOW - 601),
            Err(AuthError::Timestamp(_))
        ));
        assert_eq!(Verifier::default().verify(&app(), "GET", "/apps/app-id/channels", &query, b"", NOW + 600), Ok(()));
        let other = App { key: "other".into(), ..app() };
        let query = sign_query(&other, "GET", "/apps/app-id/channels", b"", &[], NOW);
        assert_eq!(Verifier::default().verify(&app(), "GET", "/apps/app-id/channels", &query, b"", NOW), Err(AuthError::UnknownKey));
        assert_eq!(Verifier::default().verify(&app(), "GET", "/x", "", b"", NOW), Err(AuthError::Missing("auth_key")));
        assert_eq!(
            Verifier::default().verify(&app(), "GET", "/x", "auth_key=app-key&auth_version=2.0", b"", NOW),
            Err(AuthError::Version("2.0".into()))
        );
    }
}
