//! Admin bearer token and shopper JWTs (HS256, `sub`, `exp` enforced when present).

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use stampede_engine::Actor;
use stampede_types::UserId;

use crate::AppState;
use crate::error::ApiError;

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a shopper token says: minted with these, and what a verified one yields (read
/// through `Checked`, which refuses what jsonwebtoken refuses).
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

/// `exp` when present: a whole number of seconds, never `null` (jsonwebtoken's
/// validation refuses `null`).
fn present_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(d).map(Some)
}

/// Verified tokens are remembered so a shopper hammering "buy" is verified once, not
/// per request. Bounded: each shard is cleared when it reaches its share, and made
/// that large at start, so a sale's first wave of new shoppers never waits while a
/// shard grows. Hashed with foldhash, not SipHash: a token hashed three times per new
/// shopper with SipHash was ~1,300 instructions of a purchase, and only tokens that
/// passed HMAC verification are stored, so nobody can choose colliding keys.
const TOKEN_CACHE_SHARDS: usize = 16;
const TOKEN_CACHE_ENTRIES_MAX: usize = 65_536;

type TokenHasher = foldhash::fast::RandomState;

struct Verified {
    user: UserId,
    exp: Option<u64>,
}

/// HS256 verification of a shopper token, keyed once: the HMAC's inner and outer key
/// blocks are computed at start and cloned per token. `jsonwebtoken::decode` does the
/// same checks with more work (it keys a new HMAC behind a box, decodes and parses the
/// header twice and the claims twice): 0.61× the time for a token first seen
/// (BENCHMARKS.md, "A new shopper's token verified keyed once"), which every purchase
/// pays in a sale where each shopper buys once. The checks are jsonwebtoken's, for the
/// validation `Auth` asked of it (HS256 only, no leeway, `exp` checked when present,
/// nothing else required), in its order: the header as its `Header` type with `alg` HS256, the
/// signature in constant time (`hmac`'s `verify_slice`), then the claims and `exp`. One
/// check more than jsonwebtoken's: a header naming critical extensions (`crit`) is
/// refused, as RFC 7515 asks of a verifier that understands none. A property test holds
/// the two to the same verdict for any token but those.
#[derive(Clone)]
struct Hs256(Hmac<Sha256>);

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Expired,
    Invalid(&'static str),
}

impl Hs256 {
    fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"))
    }

    fn verify(&self, token: &str, now_s: u64) -> Result<Claims, Refused> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (message, signature) = token
            .rsplit_once('.')
            .ok_or(Refused::Invalid("not a JWT"))?;
        let (header, payload) = message
            .rsplit_once('.')
            .ok_or(Refused::Invalid("not a JWT"))?;
        let header: Header = b64
            .decode(header)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(Refused::Invalid("malformed header"))?;
        if header.alg != Algorithm::HS256 {
            return Err(Refused::Invalid("algorithm is not HS256"));
        }
        // RFC 7515 §4.1.11: a token that names critical extensions must be refused by a
        // verifier that does not understand them, and this one understands none
        // (jsonwebtoken reads `crit` and ignores it).
        if header.crit.is_some() {
            return Err(Refused::Invalid(
                "critical header extensions are not understood",
            ));
        }
        let signature = b64
            .decode(signature)
            .map_err(|_| Refused::Invalid("malformed signature"))?;
        let mut mac = self.0.clone();
        mac.update(message.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| Refused::Invalid("bad signature"))?;
        let checked: Checked = b64
            .decode(payload)
            .ok()
            .filter(|json| json.trim_ascii_start().first() == Some(&b'{'))
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(Refused::Invalid("malformed claims"))?;
        if is_past(checked.exp, now_s) {
            return Err(Refused::Expired);
        }
        Ok(Claims {
            sub: checked.sub,
            exp: checked.exp,
        })
    }
}

/// The claims as jsonwebtoken's `decode` reads them: an object (never an array read by
/// position), `sub` a string, `exp` absent or a whole number. `aud`, `iss` and `nbf`
/// are not checked, but named, so a duplicate of one is refused as jsonwebtoken refuses
/// it; `nbf` is refused when it is an array or an object with anything in it, which
/// jsonwebtoken's reading of it cannot get past.
#[derive(Deserialize)]
struct Checked {
    sub: String,
    #[serde(default, deserialize_with = "present_seconds")]
    exp: Option<u64>,
    #[serde(default, rename = "aud")]
    _aud: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "iss")]
    _iss: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "nbf", deserialize_with = "flat_value")]
    _nbf: (),
}

/// Any value but an array or object that holds something.
fn flat_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(), D::Error> {
    struct Flat;
    impl<'de> serde::de::Visitor<'de> for Flat {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number, string, boolean, null, [] or {}")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_none<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            match seq.next_element::<serde::de::IgnoredAny>()? {
                None => Ok(()),
                Some(_) => Err(serde::de::Error::custom("a non-empty array")),
            }
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            match map.next_key::<serde::de::IgnoredAny>()? {
                None => Ok(()),
                Some(_) => Err(serde::de::Error::custom("a non-empty object")),
            }
        }
    }
    d.deserialize_any(Flat)
}

pub struct Auth {
    admin_token: Secret,
    hs256: Hs256,
    cache: Vec<Mutex<HashMap<Box<str>, Verified, TokenHasher>>>,
    hasher: TokenHasher,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a token with this `exp` has expired at `now_s`. RFC 7519 §4.1.4: accepted
/// only while the time is before `exp`; a whole-second clock at `exp` may already be
/// past it. The one rule for a token verified now and for one found in the cache.
fn is_past(exp: Option<u64>, now_s: u64) -> bool {
    exp.is_some_and(|exp| exp <= now_s)
}

/// 401 `token_expired`, whether the token is verified now or was found in the cache.
fn expired() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "token_expired",
        "the token has expired",
    )
}

/// Compares without an early exit, so the time taken does not reveal the prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(admin_token: Secret, jwt_secret: &Secret) -> Self {
        Self {
            admin_token,
            hs256: Hs256::new(jwt_secret.expose().as_bytes()),
            cache: (0..TOKEN_CACHE_SHARDS)
                .map(|_| {
                    Mutex::new(HashMap::with_capacity_and_hasher(
                        TOKEN_CACHE_ENTRIES_MAX / TOKEN_CACHE_SHARDS,
                        TokenHasher::default(),
                    ))
                })
                .collect(),
            hasher: TokenHasher::default(),
        }
    }

    pub fn is_admin(&self, token: &str) -> bool {
        constant_time_eq(token.as_bytes(), self.admin_token.expose().as_bytes())
    }

    pub fn shopper(&self, token: &str) -> Result<UserId, ApiError> {
        let shard = &self.cache[(self.hasher.hash_one(token) as usize) % TOKEN_CACHE_SHARDS];
        if let Some(verified) = shard.lock().get(token) {
            return if is_past(verified.exp, now_s()) {
                Err(expired())
            } else {
                Ok(verified.user.clone())
            };
        }
        let claims = self
            .hs256
            .verify(token, now_s())
            .map_err(|refused| match refused {
                Refused::Expired => expired(),
                Refused::Invalid(why) => {
                    ApiError::unauthorized(format!("invalid shopper token: {why}"))
                }
            })?;
        let user =
            UserId::parse_sub(&claims.sub).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let mut shard = shard.lock();
        if shard.len() >= TOKEN_CACHE_ENTRIES_MAX / TOKEN_CACHE_SHARDS {
            shard.clear();
        }
        shard.insert(
            token.into(),
            Verified {
                user: user.clone(),
                exp: claims.exp,
            },
        );
        Ok(user)
    }
}

/// Mints a shopper token: for the demo, the pressure tool and tests.
pub fn mint_shopper_token(jwt_secret: &Secret, sub: &str, exp: Option<u64>) -> String {
    let claims = Claims {
        sub: sub.to_owned(),
        exp,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(jwt_secret.expose().as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization is not ASCII"))?;
    // The scheme is case-insensitive (RFC 9110 11.1): `bearer` is `Bearer`.
    value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
        .map(|_| value[7..].trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <token>"))
}

/// What a route asks of its caller: the extractor its handler takes first
/// ([`Admin`], [`Shopper`], [`Caller`]), so the guard can ask the same before it books
/// anything for the request (see `GUARDED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Nothing: anyone may ask.
    Public,
    /// A shopper token.
    Shopper,
    /// A shopper token or the admin token.
    Caller,
    /// The admin token.
    Admin,
}

impl Auth {
    fn admin_of(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.is_admin(bearer(headers)?) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("admin token required"))
        }
    }

    fn shopper_of(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        self.shopper(bearer(headers)?)
    }

    fn caller_of(&self, headers: &HeaderMap) -> Result<Actor, ApiError> {
        let token = bearer(headers)?;
        if self.is_admin(token) {
            return Ok(Actor::Admin);
        }
        self.shopper(token).map(Actor::Shopper)
    }

    /// The refusal the route's handler would answer for `headers`' credential, if any:
    /// the same check its extractor makes (a verified shopper token is cached, so the
    /// handler's own check after this one costs a lookup). Passed, the shopper it names,
    /// if a shopper's token is what it asks.
    pub(crate) fn check(
        &self,
        credential: Credential,
        headers: &HeaderMap,
    ) -> Result<Option<UserId>, ApiError> {
        match credential {
            Credential::Public => Ok(None),
            Credential::Shopper => self.shopper_of(headers).map(Some),
            Credential::Caller => self.caller_of(headers).map(|_| None),
            Credential::Admin => self.admin_of(headers).map(|()| None),
        }
    }
}

/// Extractor: the caller holds the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.admin_of(&parts.headers).map(|()| Admin)
    }
}

/// Extractor: the caller is a shopper with a valid JWT.
pub struct Shopper(pub UserId);

impl FromRequestParts<AppState> for Shopper {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.shopper_of(&parts.headers).map(Shopper)
    }
}

/// Extractor: admin or shopper.
pub struct Caller(pub Actor);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.caller_of(&parts.headers).map(Caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use proptest::prelude::*;

    /// What a token gets: the claims, expired, or refused for anything else.
    #[derive(Debug, PartialEq, Eq)]
    enum Verdict {
        Accepted(String, Option<u64>),
        Expired,
        Invalid,
    }

    /// jsonwebtoken's `decode` with the validation this module stood on before it
    /// verified tokens itself.
    fn jsonwebtoken_verdict(token: &str, secret: &str) -> Verdict {
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_aud = false;
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
        match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
            Ok(data) => Verdict::Accepted(data.claims.sub, data.claims.exp),
            Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                Verdict::Expired
            }
            Err(_) => Verdict::Invalid,
        }
    }

    /// jsonwebtoken's verdict, but a token whose header names critical extensions is
    /// refused (jsonwebtoken ignores `crit`; RFC 7515 says refuse).
    fn expected_verdict(token: &str, secret: &str) -> Verdict {
        use base64::Engine as _;
        let critical = token
            .rsplit_once('.')
            .and_then(|(message, _)| message.rsplit_once('.'))
            .and_then(|(header, _)| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(header)
                    .ok()
            })
            .and_then(|json| serde_json::from_slice::<Header>(&json).ok())
            .is_some_and(|header| header.alg == Algorithm::HS256 && header.crit.is_some());
        if critical {
            Verdict::Invalid
        } else {
            jsonwebtoken_verdict(token, secret)
        }
    }

    fn our_verdict(token: &str, secret: &str) -> Verdict {
        match Hs256::new(secret.as_bytes()).verify(token, now_s()) {
            Ok(claims) => Verdict::Accepted(claims.sub, claims.exp),
            Err(Refused::Expired) => Verdict::Expired,
            Err(Refused::Invalid(_)) => Verdict::Invalid,
        }
    }

    fn headers() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => Just(r#"{"alg":"HS256","typ":"JWT"}"#),
            6 => Just(r#"{"alg":"HS256"}"#),
            6 => Just(r#"{"typ":"JWT","kid":"k1","alg":"HS256"}"#),
            1 => Just(r#"{"alg":"HS256","crit":["exp"],"x":{"y":[1,2]}}"#),
            1 => Just(r#"{"alg":"HS256","typ":5}"#),
            1 => Just(r#"{"alg":"HS256","alg":"HS256"}"#),
            1 => Just(r#"{"alg":"HS2\u0035\u0036"}"#),
            1 => Just(r#"{"alg":"hs256"}"#),
            1 => Just(r#"{"alg":"none"}"#),
            1 => Just(r#"{"alg":"HS384"}"#),
            1 => Just(r#"{"alg":"RS256"}"#),
            1 => Just(r#"{"typ":"JWT"}"#),
            1 => Just(r#"{"alg":null}"#),
            1 => Just(r#"["HS256"]"#),
            1 => Just("not json"),
            1 => Just(""),
        ]
        .prop_map(str::to_owned)
    }

    /// Claims as JSON text: `sub` and `exp` well formed, missing, mistyped, or
    /// escaped; claims the contract does not name; now and then a duplicate key or
    /// text that is not an object.
    fn claims() -> impl Strategy<Value = String> {
        let now = now_s();
        let sub = prop_oneof![
            6 => "[a-z0-9-]{1,12}".prop_map(|s| format!(r#""sub":"{s}""#)),
            1 => Just(r#""sub":"al\u0069ce""#.to_owned()),
            1 => Just(r#""sub":"""#.to_owned()),
            1 => Just(r#""sub":42"#.to_owned()),
            1 => Just(r#""sub":null"#.to_owned()),
            1 => Just(r#""sub":"a","sub":"b""#.to_owned()),
            1 => Just(String::new()),
        ];
        let exp = prop_oneof![
            4 => (now + 60..now + 100_000).prop_map(|e| format!(r#""exp":{e}"#)),
            3 => (1..now - 60).prop_map(|e| format!(r#""exp":{e}"#)),
            1 => Just(format!(r#""exp":{}"#, u64::MAX)),
            1 => Just(r#""exp":null"#.to_owned()),
            1 => Just(format!(r#""exp":{}.5"#, now + 600)),
            1 => Just(r#""exp":-1"#.to_owned()),
            1 => Just(format!(r#""exp":"{}""#, now + 600)),
            3 => Just(String::new()),
        ];
        let other = prop_oneof![
            Just(String::new()),
            Just(r#""aud":"shop","iss":"idp""#.to_owned()),
            Just(r#""aud":5"#.to_owned()),
            Just(r#""aud":["a",{"b":[1]}]"#.to_owned()),
            Just(r#""aud":"a","aud":"b""#.to_owned()),
            Just(r#""iss":"a","iss":"b""#.to_owned()),
            Just(r#""x":1,"x":2"#.to_owned()),
            Just(r#""nbf":"soon""#.to_owned()),
            Just(format!(r#""nbf":{}"#, now + 3_600)),
            Just(r#""nbf":1,"nbf":2"#.to_owned()),
            Just(r#""nbf":null"#.to_owned()),
            Just(r#""nbf":true"#.to_owned()),
            Just(r#""nbf":-1.5"#.to_owned()),
            Just(r#""nbf":[]"#.to_owned()),
            Just(r#""nbf":[1]"#.to_owned()),
            Just(r#""nbf":{}"#.to_owned()),
            Just(r#""nbf":{"a":1}"#.to_owned()),
        ];
        (sub, exp, other, any::<u8>()).prop_map(move |(sub, exp, other, shape)| {
            let fields: Vec<&str> = [sub.as_str(), exp.as_str(), other.as_str()]
                .into_iter()
                .filter(|f| !f.is_empty())
                .collect();
            match shape % 16 {
                // What a struct could read by position: `sub`, then `exp`.
                0 => format!(r#"["alice",{}]"#, now + 600),
                1 => "null".to_owned(),
                2 => format!(" \n{{{}}}", fields.join(",")),
                _ => format!("{{{}}}", fields.join(",")),
            }
        })
    }

    /// A token built from a header and claims, signed with the right key or another,
    /// then perhaps damaged the ways a client or an attacker might.
    fn tokens() -> impl Strategy<Value = String> {
        let right_key = prop::bool::weighted(0.75);
        (headers(), claims(), right_key, 0u8..16, any::<usize>()).prop_map(
            |(header, claims, right_key, damage, at)| {
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let message = format!("{}.{}", b64.encode(header), b64.encode(claims));
                let key: &[u8] = if right_key { b"jwt-secret" } else { b"other" };
                let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
                mac.update(message.as_bytes());
                let signature = b64.encode(mac.finalize().into_bytes());
                let token = format!("{message}.{signature}");
                let at = at % token.len();
                match damage {
                    0 => format!("{token}="),
                    1 => format!("{token}.x"),
                    2 => format!("x.{token}"),
                    3 => token[..token.len() - 1].to_owned(),
                    4 => {
                        let mut bytes = token.into_bytes();
                        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
                        String::from_utf8(bytes).unwrap()
                    }
                    5 => format!(
                        "{message}.{}",
                        signature.replace('-', "+").replace('_', "/")
                    ),
                    6 => format!("{message}."),
                    7 => message,
                    _ => token,
                }
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4_000))]
        /// Our verifier accepts exactly the tokens jsonwebtoken accepts (but those
        /// naming critical extensions), with the same claims, and calls expired exactly
        /// those it calls expired.
        #[test]
        fn a_token_gets_jsonwebtokens_verdict(token in tokens()) {
            prop_assert_eq!(our_verdict(&token, "jwt-secret"), expected_verdict(&token, "jwt-secret"));
        }

        #[test]
        fn any_text_gets_jsonwebtokens_verdict(token in "[A-Za-z0-9_.=+/-]{0,120}") {
            prop_assert_eq!(our_verdict(&token, "jwt-secret"), expected_verdict(&token, "jwt-secret"));
        }
    }

    /// The generator reaches every verdict often, so the property above compares
    /// acceptances and expiries, not only refusals.
    #[test]
    fn the_generated_tokens_reach_every_verdict() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut accepted, mut expired, mut invalid) = (0, 0, 0);
        for _ in 0..4_000 {
            let token = tokens().new_tree(&mut runner).unwrap().current();
            match jsonwebtoken_verdict(&token, "jwt-secret") {
                Verdict::Accepted(..) => accepted += 1,
                Verdict::Expired => expired += 1,
                Verdict::Invalid => invalid += 1,
            }
        }
        assert!(
            accepted >= 60 && expired >= 20 && invalid >= 1_000,
            "{accepted} accepted, {expired} expired, {invalid} invalid"
        );
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_token_is_checked_for_its_signature_sub_and_exp_only() {
        let auth = Auth::new(Secret::new("admin"), &Secret::new("jwt"));
        let later = now_s() + 60;
        // Claims the contract does not name (an audience, an issuer) are not refused.
        let with_aud = token(
            serde_json::json!({"sub": "alice", "exp": later, "aud": "shop", "iss": "idp"}),
            "jwt",
        );
        assert_eq!(auth.shopper(&with_aud).unwrap().as_str(), "alice");
        let no_exp = token(serde_json::json!({"sub": "bob"}), "jwt");
        assert_eq!(auth.shopper(&no_exp).unwrap().as_str(), "bob");
        // Wrong key, no sub, expired: refused.
        let forged = token(serde_json::json!({"sub": "eve", "exp": later}), "other");
        assert_eq!(auth.shopper(&forged).unwrap_err().code, "unauthorized");
        let anonymous = token(serde_json::json!({"exp": later}), "jwt");
        assert_eq!(auth.shopper(&anonymous).unwrap_err().code, "unauthorized");
        let expired = token(serde_json::json!({"sub": "carol", "exp": 1}), "jwt");
        assert_eq!(auth.shopper(&expired).unwrap_err().code, "token_expired");
        // RFC 7519: good only before its `exp`. At the `exp` second itself the time may
        // already be past it (jsonwebtoken with no leeway accepts it; we do not).
        let hs256 = Hs256::new(b"jwt");
        let at = token(serde_json::json!({"sub": "dan", "exp": 1_000}), "jwt");
        assert_eq!(hs256.verify(&at, 999).unwrap().sub, "dan");
        assert_eq!(hs256.verify(&at, 1_000).unwrap_err(), Refused::Expired);
    }

    /// RFC 7515 §4.1.11: critical extensions this verifier does not understand (it
    /// understands none) make the token invalid, even when signed with the right key.
    #[test]
    fn a_token_naming_critical_extensions_is_refused() {
        let auth = Auth::new(Secret::new("admin"), &Secret::new("jwt"));
        let claims = serde_json::json!({"sub": "alice", "exp": now_s() + 60});
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["b64".to_owned()]);
        let critical =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"jwt")).unwrap();
        assert_eq!(
            jsonwebtoken_verdict(&critical, "jwt"),
            Verdict::Accepted("alice".into(), claims["exp"].as_u64())
        );
        assert_eq!(auth.shopper(&critical).unwrap_err().code, "unauthorized");
        let plain = token(claims, "jwt");
        assert_eq!(auth.shopper(&plain).unwrap().as_str(), "alice");
    }
}
