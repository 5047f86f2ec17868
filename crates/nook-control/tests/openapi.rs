//! The checked-in OpenAPI document must match the one generated from the code. To update it after an intended API
//! change: `UPDATE_OPENAPI=1 cargo test -p nook-control --test openapi`.

use std::path::Path;

#[test]
fn checked_in_openapi_matches_the_code() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../openapi/nook-v1.json");
    let generated = nook_control::api::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/nook-v1.json is out of date with the code; if the API change is intended, run \
         `UPDATE_OPENAPI=1 cargo test -p nook-control --test openapi` and commit the file"
    );
}
