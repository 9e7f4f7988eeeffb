//! The catalogue name a pull gets when the caller gives none.

/// `host:5000/team/py:3.12` → `py:3.12`; no tag → `:latest`; a digest
/// ref without a tag → `py:sha256-<first 12 hex>`. Characters a name may
/// not have become `-`; the result passes `validate_image_name`.
pub fn default_name(reference: &str) -> String {
    let (path, digest) = match reference.split_once('@') {
        Some((p, d)) => (p, Some(d)),
        None => (reference, None),
    };
    let last = path.rsplit('/').next().unwrap_or(path);
    let (repo, tag) = match last.split_once(':') {
        Some((r, t)) => (r, Some(t.to_owned())),
        None => (last, None),
    };
    let tag = tag.unwrap_or_else(|| match digest {
        Some(d) => {
            let (alg, hex) = d.split_once(':').unwrap_or(("sha256", d));
            format!("{alg}-{}", hex.chars().take(12).collect::<String>())
        }
        None => "latest".into(),
    });
    let raw = format!("{repo}:{tag}").to_ascii_lowercase();
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'i');
        name.truncate(128);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::default_name;
    use crate::api_types::validate_image_name;

    #[test]
    fn names_from_refs() {
        for (r, want) in [
            ("127.0.0.1:5000/t/py:3.12", "py:3.12"),
            ("docker.io/library/python:3.12-slim", "python:3.12-slim"),
            ("alpine", "alpine:latest"),
            ("localhost:5000/alpine", "alpine:latest"),
            (
                "reg/x/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "app:sha256-0123456789ab",
            ),
            ("reg/app:v1@sha256:00", "app:v1"),
            ("reg/App:V_1", "app:v_1"),
            ("reg/_x:1", "i_x:1"),
        ] {
            let n = default_name(r);
            assert_eq!(n, want, "{r}");
            validate_image_name("name", &n).unwrap();
        }
    }
}
