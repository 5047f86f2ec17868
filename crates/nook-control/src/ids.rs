//! Random identifiers and API keys, and the one-way hash under which keys are stored.

use rand::Rng;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `prefix` followed by 20 random lowercase letters and digits (about 103 bits).
pub fn random_id(prefix: &str) -> String {
    random_id_of(prefix, nook_api::names::SANDBOX_ID_RANDOM_LEN)
}

/// `prefix` followed by `len` random lowercase letters and digits.
fn random_id_of(prefix: &str, len: usize) -> String {
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    id
}

/// A new build id: `bld-` and 16 random lowercase letters and digits (about 82 bits; short, because step sandboxes
/// and their socket paths carry it).
pub fn build_id() -> String {
    random_id_of("bld-", 16)
}

/// A new sandbox id.
pub fn sandbox_id() -> String {
    random_id(nook_api::names::SANDBOX_ID_PREFIX)
}

/// A new API key: `nook_` and 40 random characters (about 206 bits), shown once and stored only as a hash.
pub fn api_key() -> String {
    let mut rng = rand::thread_rng();
    let mut key = String::from("nook_");
    for _ in 0..40 {
        key.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    key
}

/// The stored form of a key. Keys are long random strings, so a plain SHA-256 cannot be brute-forced.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The 32-byte secret kept in `path` (owner-only), made from the system's randomness the first time.
pub fn load_or_create_secret(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => return Ok(bytes.try_into().expect("32 bytes")),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the secret file does not hold 32 bytes",
            ))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let secret: [u8; 32] = rand::random();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&secret)?;
    file.sync_all()?;
    Ok(secret)
}

/// HMAC-SHA256 of `parts` (each followed by a NUL, so that no two lists of parts sign alike) under `secret`, in
/// hex. The first part names the purpose, so that a signature made for one use is worth nothing for another.
pub fn signature(secret: &[u8; 32], parts: &[&[u8]]) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
        mac.update(b"\0");
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Compares two secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_api_shape() {
        let id = sandbox_id();
        assert!(nook_api::names::is_sandbox_id(&id), "{id}");
        assert_ne!(sandbox_id(), id);
    }

    #[test]
    fn build_ids_are_short_and_distinct() {
        let id = build_id();
        assert!(id.starts_with("bld-") && id.len() == 20, "{id}");
        assert_ne!(build_id(), id);
    }

    #[test]
    fn keys_hash_stably() {
        let key = api_key();
        assert_eq!(key.len(), 45);
        assert_eq!(hash_key(&key), hash_key(&key));
        assert_ne!(hash_key(&key), hash_key(&api_key()));
    }
}
