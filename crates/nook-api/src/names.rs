//! Validation of identifiers that clients choose or send: sandbox ids and names, image names, label keys and
//! environment variable names. Each check returns a sentence saying what is wrong, ready for an error message. Also
//! the text form of UUIDs, which nook both reads (btrfs filesystem ids) and hands out (E2B's ids).

/// Prefix of every sandbox id.
pub const SANDBOX_ID_PREFIX: &str = "sb-";
/// Number of random characters after the prefix.
pub const SANDBOX_ID_RANDOM_LEN: usize = 20;

/// 16 bytes in the canonical UUID form: 8-4-4-4-12 lowercase hex digits.
pub fn uuid_text(bytes: [u8; 16]) -> String {
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// True when `text` has the exact shape of a sandbox id (`sb-` and 20 lowercase letters or digits).
pub fn is_sandbox_id(text: &str) -> bool {
    text.strip_prefix(SANDBOX_ID_PREFIX).is_some_and(|rest| {
        rest.len() == SANDBOX_ID_RANDOM_LEN && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// Checks a sandbox name: a DNS label (1-63 lowercase letters, digits and inner hyphens), since it becomes the
/// hostname. Names shaped like ids are refused so that `get by id or name` is never ambiguous.
pub fn check_sandbox_name(name: &str) -> Result<(), String> {
    check_dns_label(name, "sandbox name")?;
    if is_sandbox_id(name) {
        return Err(format!(
            "sandbox name {name:?} has the shape of a sandbox id; choose another"
        ));
    }
    Ok(())
}

fn check_dns_label(text: &str, what: &str) -> Result<(), String> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} {text:?} is invalid: use 1 to 63 lowercase letters, digits and hyphens, \
             starting and ending with a letter or digit"
        ))
    }
}

/// Checks an image name: 1-128 characters of lowercase letters, digits and `._-:/`, starting with a letter or
/// digit, with no `..` component.
pub fn check_image_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/' | b'@')
        })
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "image name {name:?} is invalid: use up to 255 lowercase letters, digits and . _ - : / @, \
             starting with a letter or digit"
        ))
    }
}

/// Checks a label key: 1-63 characters of letters, digits and `._-/`.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "label key {key:?} is invalid: use 1 to 63 letters, digits and . _ - /"
        ))
    }
}

/// Checks an environment variable name: a letter or `_`, then letters, digits or `_`, at most 255 bytes.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 255
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "environment variable name {name:?} is invalid: use letters, digits and _, not starting with a digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_have_the_canonical_form() {
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(uuid_text(bytes), "00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn sandbox_ids_have_one_shape() {
        assert!(is_sandbox_id("sb-abcdefghij0123456789"));
        assert!(!is_sandbox_id("sb-abcdefghij012345678"));
        assert!(!is_sandbox_id("sb-ABCDEFGHIJ0123456789"));
        assert!(!is_sandbox_id("xx-abcdefghij0123456789"));
    }

    #[test]
    fn sandbox_names_are_dns_labels() {
        assert!(check_sandbox_name("web-1").is_ok());
        assert!(check_sandbox_name("").is_err());
        assert!(check_sandbox_name("-web").is_err());
        assert!(check_sandbox_name("Web").is_err());
        assert!(check_sandbox_name("a/b").is_err());
        assert!(check_sandbox_name(&"a".repeat(64)).is_err());
        assert!(check_sandbox_name("sb-abcdefghij0123456789").is_err());
    }

    #[test]
    fn image_names_cannot_climb_out() {
        assert!(check_image_name("base").is_ok());
        assert!(check_image_name("team/python:3.12").is_ok());
        let by_digest = format!("registry.test:5000/team/app@sha256:{}", "a".repeat(64));
        assert!(check_image_name(&by_digest).is_ok());
        assert!(check_image_name("../etc").is_err());
        assert!(check_image_name("a/../b").is_err());
        assert!(check_image_name("/abs").is_err());
        assert!(check_image_name("a//b").is_err());
    }

    #[test]
    fn env_names_follow_posix() {
        assert!(check_env_name("PATH").is_ok());
        assert!(check_env_name("_x1").is_ok());
        assert!(check_env_name("1X").is_err());
        assert!(check_env_name("A=B").is_err());
        assert!(check_env_name("").is_err());
    }
}
