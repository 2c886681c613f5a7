//! Auth tokens, as etcd's `--auth-token` chooses them:
//!
//! - `simple`: a random 16-letter string, a dot and a sequence number, remembered in memory with
//!   a TTL (`--auth-token-ttl`, 300 s) that every use renews. Disabling auth or changing or
//!   deleting a user forgets that user's tokens. A restart forgets them all.
//! - `jwt,pub-key=PATH,priv-key=PATH,sign-method=ALG[,ttl=DURATION]`: a signed JWT with the
//!   claims `username`, `revision` (the auth revision when it was issued) and `exp`
//!   (default TTL 5 minutes). Paths are relative to the server's working directory; the public
//!   key may be a certificate. Without a private key the server only verifies.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// etcd's simple-token letters and length.
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
const SIMPLE_TOKEN_LEN: usize = 16;
/// etcd's default JWT TTL.
const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

/// Who a token speaks for, and the auth revision it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub username: String,
    pub revision: u64,
}

pub enum Tokens {
    Simple(SimpleTokens),
    Jwt(Box<JwtTokens>),
}

impl Tokens {
    /// Parses `--auth-token` (etcd's "type,opt=value,..." form); `ttl` is --auth-token-ttl.
    pub fn from_flag(flag: &str, ttl: Duration) -> anyhow::Result<Self> {
        let mut parts = flag.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut opts = HashMap::new();
        for part in parts {
            let pair: Vec<&str> = part.split('=').collect();
            if pair.len() != 2 || opts.insert(pair[0], pair[1]).is_some() {
                bail!("auth: invalid auth options ({flag:?})");
            }
        }
        match kind {
            "simple" => Ok(Tokens::Simple(SimpleTokens::new(ttl))),
            "jwt" => Ok(Tokens::Jwt(Box::new(JwtTokens::from_options(&opts)?))),
            other => bail!("auth: invalid auth options (unknown token type {other:?})"),
        }
    }

    /// A new token for `username`, issued at auth revision `revision`.
    pub fn assign(&self, username: &str, revision: u64) -> anyhow::Result<String> {
        match self {
            Tokens::Simple(s) => Ok(s.assign(username)),
            Tokens::Jwt(j) => j.assign(username, revision),
        }
    }

    /// The user behind a valid token; simple tokens carry the current auth revision.
    pub fn info(&self, token: &str, current_revision: u64) -> Option<TokenInfo> {
        match self {
            Tokens::Simple(s) => {
                s.info(token).map(|username| TokenInfo { username, revision: current_revision })
            }
            Tokens::Jwt(j) => j.info(token),
        }
    }

    pub fn set_enabled(&self, enabled: bool) {
        if let Tokens::Simple(s) = self {
            s.set_enabled(enabled)
        }
    }

    pub fn invalidate_user(&self, username: &str) {
        if let Tokens::Simple(s) = self {
            s.invalidate_user(username)
        }
    }
}

/// In-memory random tokens with a sliding TTL.
pub struct SimpleTokens {
    ttl: Duration,
    next_index: AtomicU64,
    inner: Mutex<SimpleInner>,
}

#[derive(Default)]
struct SimpleInner {
    enabled: bool,
    /// token -> (user, expiry)
    tokens: HashMap<String, (String, Instant)>,
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> Self {
        let ttl = if ttl.is_zero() { Duration::from_secs(300) } else { ttl };
        Self { ttl, next_index: AtomicU64::new(1), inner: Mutex::new(SimpleInner::default()) }
    }

    fn assign(&self, username: &str) -> String {
        let mut rng = rand::thread_rng();
        let prefix: String =
            (0..SIMPLE_TOKEN_LEN).map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char).collect();
        let token = format!("{prefix}.{}", self.next_index.fetch_add(1, Ordering::Relaxed));
        let mut inner = self.inner.lock().expect("simple tokens");
        if inner.enabled {
            let now = Instant::now();
            inner.tokens.retain(|_, (_, expiry)| *expiry > now);
            inner.tokens.insert(token.clone(), (username.to_string(), now + self.ttl));
        }
        token
    }

    fn info(&self, token: &str) -> Option<String> {
        let (prefix, index) = token.split_once('.')?;
        if prefix.contains('.') || index.parse::<u64>().is_err() {
            return None;
        }
        let mut inner = self.inner.lock().expect("simple tokens");
        let now = Instant::now();
        let (user, expiry) = inner.tokens.get_mut(token)?;
        if *expiry <= now {
            inner.tokens.remove(token);
            return None;
        }
        *expiry = now + self.ttl;
        Some(user.clone())
    }

    fn set_enabled(&self, enabled: bool) {
        let mut inner = self.inner.lock().expect("simple tokens");
        if inner.enabled != enabled {
            inner.enabled = enabled;
            inner.tokens.clear();
        }
    }

    fn invalidate_user(&self, username: &str) {
        self.inner.lock().expect("simple tokens").tokens.retain(|_, (user, _)| user != username);
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// Signed JWTs.
pub struct JwtTokens {
    alg: Algorithm,
    ttl: Duration,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
}

impl JwtTokens {
    pub fn from_options(opts: &HashMap<&str, &str>) -> anyhow::Result<Self> {
        let ttl = match opts.get("ttl") {
            Some(t) if !t.is_empty() => crate::godur::parse(t).map_err(|e| anyhow!("auth: invalid jwt ttl: {e}"))?,
            _ => DEFAULT_JWT_TTL,
        };
        let read = |opt: &str| -> anyhow::Result<Option<Vec<u8>>> {
            match opts.get(opt) {
                Some(path) if !path.is_empty() => {
                    Ok(Some(std::fs::read(path).with_context(|| format!("reading {opt} {path}"))?))
                }
                _ => Ok(None),
            }
        };
        let (public, private) = (read("pub-key")?, read("priv-key")?);
        let method = opts.get("sign-method").copied().unwrap_or_default();
        let alg: Algorithm = method.parse().map_err(|_| anyhow!("auth: invalid auth signature method"))?;
        for key in opts.keys().filter(|k| !["ttl", "pub-key", "priv-key", "sign-method"].contains(k)) {
            tracing::warn!("unknown JWT option {key:?}");
        }
        let (encoding, decoding) = keys(alg, public.as_deref(), private.as_deref())?;
        Ok(Self { alg, ttl, encoding, decoding })
    }

    fn assign(&self, username: &str, revision: u64) -> anyhow::Result<String> {
        let key = self.encoding.as_ref().ok_or_else(|| anyhow!("auth: token signing attempted with verify-only key"))?;
        let exp = (SystemTime::now() + self.ttl).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = Claims { username: username.to_string(), revision, exp };
        Ok(jsonwebtoken::encode(&Header::new(self.alg), &claims, key)?)
    }

    fn info(&self, token: &str) -> Option<TokenInfo> {
        let mut validation = Validation::new(self.alg);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation) {
            Ok(data) => Some(TokenInfo { username: data.claims.username, revision: data.claims.revision }),
            Err(e) => {
                tracing::warn!(error = %e, "failed to parse a JWT token");
                None
            }
        }
    }
}

/// The signing key (when a private key is given) and the verifying key for `alg`.
fn keys(alg: Algorithm, public: Option<&[u8]>, private: Option<&[u8]>) -> anyhow::Result<(Option<EncodingKey>, DecodingKey)> {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => {
            let secret = private.ok_or_else(|| anyhow!("auth: missing key data"))?;
            Ok((Some(EncodingKey::from_secret(secret)), DecodingKey::from_secret(secret)))
        }
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            let encoding = private.map(EncodingKey::from_rsa_pem).transpose().context("parsing the RSA private key")?;
            let decoding = match (public, private) {
                (Some(p), _) => public_key(p)?,
                (None, Some(p)) => rsa_public_from_private(p)?,
                (None, None) => bail!("auth: missing key data"),
            };
            Ok((encoding, decoding))
        }
        ES256 | ES384 => {
            let encoding = private.map(EncodingKey::from_ec_pem).transpose().context("parsing the EC private key (PKCS#8 PEM)")?;
            let public = public.ok_or_else(|| anyhow!("auth: missing key data (Cairn needs pub-key for ECDSA)"))?;
            Ok((encoding, public_key(public)?))
        }
        other => bail!("auth: invalid auth signature method ({other:?} is not supported)"),
    }
}

/// The verifying key from a PEM public key ("PUBLIC KEY", "RSA PUBLIC KEY") or certificate.
fn public_key(pem: &[u8]) -> anyhow::Result<DecodingKey> {
    use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo};
    use x509_parser::public_key::PublicKey;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| anyhow!("parsing the public key PEM: {e}"))?;
    if pem.label == "RSA PUBLIC KEY" {
        return Ok(DecodingKey::from_rsa_der(&pem.contents));
    }
    let cert;
    let spki = if pem.label == "CERTIFICATE" {
        cert = pem.parse_x509().map_err(|e| anyhow!("parsing the public key certificate: {e}"))?;
        cert.public_key().clone()
    } else {
        SubjectPublicKeyInfo::from_der(&pem.contents).map_err(|e| anyhow!("parsing the public key: {e}"))?.1
    };
    match spki.parsed().map_err(|e| anyhow!("parsing the public key: {e}"))? {
        PublicKey::RSA(rsa) => Ok(DecodingKey::from_rsa_raw_components(rsa.modulus, rsa.exponent)),
        PublicKey::EC(point) => Ok(DecodingKey::from_ec_der(point.data())),
        _ => bail!("unsupported public key type"),
    }
}

/// An RSA private key in PKCS#1 PEM holds the modulus and public exponent; etcd verifies with
/// them when no public key is given.
fn rsa_public_from_private(pem: &[u8]) -> anyhow::Result<DecodingKey> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| anyhow!("parsing the private key PEM: {e}"))?;
    if pem.label != "RSA PRIVATE KEY" {
        bail!("auth: missing key data (give pub-key for a PKCS#8 private key)");
    }
    let (_, obj) = x509_parser::der_parser::parse_der(&pem.contents).map_err(|e| anyhow!("parsing the RSA key: {e}"))?;
    let seq = obj.as_sequence().map_err(|e| anyhow!("parsing the RSA key: {e}"))?;
    let int = |i: usize| -> anyhow::Result<&[u8]> {
        seq.get(i).ok_or_else(|| anyhow!("short RSA key"))?.as_slice().map_err(|e| anyhow!("parsing the RSA key: {e}"))
    };
    Ok(DecodingKey::from_rsa_raw_components(int(1)?, int(2)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_look_like_etcds_and_expire() {
        let t = SimpleTokens::new(Duration::from_millis(50));
        t.set_enabled(true);
        let tok = t.assign("alice");
        let (prefix, index) = tok.split_once('.').unwrap();
        assert_eq!(prefix.len(), 16);
        assert!(prefix.bytes().all(|b| b.is_ascii_alphabetic()));
        assert!(index.parse::<u64>().is_ok());
        assert_eq!(t.info(&tok).as_deref(), Some("alice"));
        assert_eq!(t.info("nodot"), None);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.info(&tok), None);
    }

    #[test]
    fn simple_tokens_forgotten_on_disable_and_user_change() {
        let t = SimpleTokens::new(Duration::from_secs(60));
        t.set_enabled(true);
        let a = t.assign("alice");
        let b = t.assign("bob");
        t.invalidate_user("alice");
        assert_eq!(t.info(&a), None);
        assert_eq!(t.info(&b).as_deref(), Some("bob"));
        t.set_enabled(false);
        assert_eq!(t.info(&b), None);
    }

    #[test]
    fn flag_parsing() {
        assert!(matches!(Tokens::from_flag("simple", Duration::from_secs(1)), Ok(Tokens::Simple(_))));
        assert!(Tokens::from_flag("bogus", Duration::from_secs(1)).is_err());
        assert!(Tokens::from_flag("jwt,sign-method", Duration::from_secs(1)).is_err());
        assert!(Tokens::from_flag("jwt,sign-method=RS256", Duration::from_secs(1)).is_err(), "no keys");
    }

    #[test]
    fn jwt_hs256_round_trip_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(&key, b"sekrit").unwrap();
        let flag = format!("jwt,priv-key={},sign-method=HS256,ttl=1s", key.display());
        let t = Tokens::from_flag(&flag, Duration::ZERO).unwrap();
        let tok = t.assign("alice", 7).unwrap();
        assert_eq!(t.info(&tok, 99), Some(TokenInfo { username: "alice".into(), revision: 7 }));
        assert_eq!(t.info("garbage", 1), None);
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(t.info(&tok, 99), None, "expired");
    }
}
