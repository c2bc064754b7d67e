//! WireGuard keys: the base64 text form `wg genkey`/`wg pubkey` use, key
//! generation, and loading a private key file safely.
//!
//! Must never: print, log or `Debug`-format private key bytes, or accept a
//! private key file that group or others can read, that another user owns,
//! or that is a symbolic link (its target could change between check and
//! read). A key file is opened once; every check is on the open file.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use boringtun::x25519;

/// Length of every X25519 key in bytes.
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the OS random number source failed: {0}")]
    Random(String),
    #[error("not a valid key: expected 44 characters of base64 encoding 32 bytes")]
    BadEncoding,
    #[error("cannot read key file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); \
         fix it with: chmod 600 {path}"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} does not hold a key: expected one base64 line as `wg genkey` writes")]
    BadFile { path: PathBuf },
    #[error(
        "key file {path} is a symbolic link; name the file itself (in a Kubernetes \
         secret volume: <volume>/..data/<key>)"
    )]
    Symlink { path: PathBuf },
    #[error("key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "key file {path} belongs to user {owner}, not to root or the user meshd runs as \
         ({running}); fix it with: chown {running} {path}"
    )]
    WrongOwner {
        path: PathBuf,
        owner: u32,
        running: u32,
    },
}

/// Longest key file read: a key is 44 characters; comments are not allowed,
/// so anything much longer is not a key file.
const MAX_KEY_FILE: u64 = 1024;

/// A peer's public key. Cheap to copy, safe to print.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl From<[u8; KEY_LEN]> for PublicKey {
    fn from(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A private key. Its `Debug` is redacted and it has no `Display`, so it
/// cannot reach a log line by accident; the bytes are wiped on drop.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl PrivateKey {
    /// A fresh key from the OS random source, clamped as `wg genkey` does.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        clamp(&mut bytes);
        Ok(Self(x25519::StaticSecret::from(bytes)))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(|bytes| Self(x25519::StaticSecret::from(bytes)))
    }

    /// Reads a key file as `wg genkey > FILE` writes it, refusing one that
    /// group or others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_secret(path).map(|bytes| Self(x25519::StaticSecret::from(bytes)))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(*x25519::PublicKey::from(&self.0).as_bytes())
    }

    /// The secret for the protocol library; the only way out of this type.
    pub fn to_x25519(&self) -> x25519::StaticSecret {
        self.0.clone()
    }

    /// The base64 text of the key, for `meshctl genkey` only.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A preshared key (`wg genpsk`), mixed into the handshake: with one set,
/// only peers holding the same key can form a tunnel. Redacted like
/// `PrivateKey`; compared only to detect configuration changes.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::getrandom(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode_key(text).map(Self)
    }

    /// Reads a key file as `wg genpsk > FILE` writes it, refusing one that
    /// group or others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        load_secret(path).map(Self)
    }

    /// The key for the protocol library; the only way out of this type.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0
    }

    /// The base64 text of the key, for `meshctl genpsk` only.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

fn load_secret(path: &Path) -> Result<[u8; KEY_LEN], KeyError> {
    let file = open_secret(path)?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(|e| KeyError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    decode_key(&text).map_err(|_| KeyError::BadFile {
        path: path.to_owned(),
    })
}

/// Opens a secret file without following a final symbolic link, and checks
/// the open file: a regular file, owned by root or the running user, that
/// group and others cannot read.
fn open_secret(path: &Path) -> Result<File, KeyError> {
    let nofollow = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow.bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => KeyError::Symlink {
                path: path.to_owned(),
            },
            _ => KeyError::Unreadable {
                path: path.to_owned(),
                reason: e.to_string(),
            },
        })?;
    let meta = file.metadata().map_err(|e| KeyError::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_owned(),
        });
    }
    let running = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != running {
        return Err(KeyError::WrongOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            running,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(file)
}

fn clamp(bytes: &mut [u8; KEY_LEN]) {
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
}

fn decode_key(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let text = text.trim();
    // 32 bytes are exactly 44 base64 characters with one '=' of padding.
    if text.len() != 44 {
        return Err(KeyError::BadEncoding);
    }
    let bytes = BASE64.decode(text).map_err(|_| KeyError::BadEncoding)?;
    bytes.try_into().map_err(|_| KeyError::BadEncoding)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn b64(hex: &str) -> String {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        BASE64.encode(bytes)
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = b64("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = b64("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let key = PrivateKey::from_base64(&private).unwrap();
        assert_eq!(key.public_key().to_string(), public);
    }

    #[test]
    fn base64_round_trips_and_tolerates_trailing_newline() {
        let key = PrivateKey::generate().unwrap();
        let text = format!("{}\n", key.to_base64());
        let again = PrivateKey::from_base64(&text).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let public = key.public_key();
        assert_eq!(PublicKey::from_base64(&public.to_string()).unwrap(), public);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate().unwrap();
        let b = PrivateKey::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
        let bytes = a.0.to_bytes();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
    }

    #[test]
    fn bad_encodings_are_rejected() {
        for bad in [
            "",
            "short",
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
            // 33 bytes of base64: right alphabet, wrong length.
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",
        ] {
            assert_eq!(
                PublicKey::from_base64(bad),
                Err(KeyError::BadEncoding),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_never_shows_private_bytes() {
        let key = PrivateKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base64()));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn key_files_are_opened_once_without_following_links_and_owned_right() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        std::fs::write(&real, PrivateKey::generate().unwrap().to_base64()).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PrivateKey::load(&real).is_ok());
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = PrivateKey::load(&link).unwrap_err();
        assert!(matches!(err, KeyError::Symlink { .. }), "{err}");
        // A link in the middle of the path is fine (Kubernetes' ..data).
        let data = dir.path().join("..data");
        std::os::unix::fs::symlink(dir.path(), &data).unwrap();
        assert!(PrivateKey::load(&data.join("real.key")).is_ok());
        let err = PrivateKey::load(dir.path()).unwrap_err();
        assert!(matches!(err, KeyError::NotAFile { .. }), "{err}");
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&real, Some(4242), None).unwrap();
            let err = PrivateKey::load(&real).unwrap_err();
            assert!(
                matches!(err, KeyError::WrongOwner { owner: 4242, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h1.key");
        std::fs::write(&path, PrivateKey::generate().unwrap().to_base64()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PrivateKey::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::TooOpen { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(PrivateKey::load(&path).is_ok());
    }

    #[test]
    fn preshared_keys_load_like_private_keys_and_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        let psk = PresharedKey::generate().unwrap();
        std::fs::write(&path, psk.to_base64()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            PresharedKey::load(&path),
            Err(KeyError::TooOpen { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(PresharedKey::load(&path).unwrap(), psk);
        assert!(!format!("{psk:?}").contains(&psk.to_base64()));
    }

    #[test]
    fn key_file_with_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            PrivateKey::load(&path),
            Err(KeyError::BadFile { .. })
        ));
    }
}
