//! Admin bearer token and shopper JWTs (HS256, `sub`, `exp` enforced when present).

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
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

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
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

pub struct Auth {
    admin_token: Secret,
    decoding: DecodingKey,
    validation: Validation,
    cache: Vec<Mutex<HashMap<Box<str>, Verified, TokenHasher>>>,
    hasher: TokenHasher,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compares without an early exit, so the time taken does not reveal the prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(admin_token: Secret, jwt_secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        validation.validate_exp = true;
        // The contract asks for `sub` and `exp` only: an identity provider's token that
        // also names an audience is not refused for it.
        validation.validate_aud = false;
        Self {
            admin_token,
            decoding: DecodingKey::from_secret(jwt_secret.expose().as_bytes()),
            validation,
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
            return match verified.exp {
                Some(exp) if exp < now_s() => Err(ApiError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    "token_expired",
                    "the token has expired",
                )),
                _ => Ok(verified.user.clone()),
            };
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => ApiError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    "token_expired",
                    "the token has expired",
                ),
                _ => ApiError::unauthorized(format!("invalid shopper token: {e}")),
            })?;
        let user =
            UserId::parse(&data.claims.sub).map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let mut shard = shard.lock();
        if shard.len() >= TOKEN_CACHE_ENTRIES_MAX / TOKEN_CACHE_SHARDS {
            shard.clear();
        }
        shard.insert(
            token.into(),
            Verified {
                user: user.clone(),
                exp: data.claims.exp,
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

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization is not ASCII"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <token>"))
}

/// Extractor: the caller holds the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if state.auth.is_admin(bearer(parts)?) {
            Ok(Admin)
        } else {
            Err(ApiError::unauthorized("admin token required"))
        }
    }
}

/// Extractor: the caller is a shopper with a valid JWT.
pub struct Shopper(pub UserId);

impl FromRequestParts<AppState> for Shopper {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.shopper(bearer(parts)?).map(Shopper)
    }
}

/// Extractor: admin or shopper.
pub struct Caller(pub Actor);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if state.auth.is_admin(token) {
            return Ok(Caller(Actor::Admin));
        }
        state
            .auth
            .shopper(token)
            .map(|user| Caller(Actor::Shopper(user)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
