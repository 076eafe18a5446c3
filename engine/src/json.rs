//! JSON request bodies, shared by the HTTP API and the admin verbs: an error that
//! names where in the document it is.

/// A JSON error with the path of the value it is about (`content.subject: invalid
/// type …`).
pub fn describe_error(
    err: serde_path_to_error::Error<serde_json::Error>,
) -> (serde_json::Error, String) {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let description = if path == "." || path.is_empty() {
        inner.to_string()
    } else {
        format!("{path}: {inner}")
    };
    (inner, description)
}
