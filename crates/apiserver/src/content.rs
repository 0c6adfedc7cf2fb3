//! Image files kept by the apiserver: `PUT .../images/{name}/content`
//! uploads the file of an Image (`nexusctl image import`), `GET` downloads
//! it (nodes, for Images with `source.uploaded`).
//!
//! Files are stored by content, `<blob dir>/sha256/<hex>`, written beside
//! their final name and renamed once complete and checked: an upload must
//! match the sha256 its Image names, so a node never downloads a file its
//! Image would refuse. Who may upload is who may update the Image; who may
//! download, who may read it (nodes may read every Image).
//!
//! With several apiservers sharing one PostgreSQL database, each keeps its
//! own blob directory: give them one shared directory (`--blob-dir`), or
//! use Images with `source.url`.

use std::path::{Path as FsPath, PathBuf};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use nexus_api::{Image, ImageSpec, ResourceSpec};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;
use crate::state::{AppState, SharedState};

/// The routes of Image files.
pub fn routes() -> Router<SharedState> {
    Router::new().route("/v1/projects/{project}/images/{name}/content", get(download).put(upload))
}

fn blob_dir(state: &AppState) -> Result<&FsPath, ApiError> {
    state.blob_dir.as_deref().ok_or_else(|| ApiError::Unavailable {
        message: "this apiserver keeps no image files".into(),
        suggestion: "start it with --blob-dir, or give the Image a source.url".into(),
    })
}

/// Where the file with `sha256` is kept.
fn blob_path(dir: &FsPath, sha256: &str) -> PathBuf {
    dir.join("sha256").join(sha256)
}

async fn image(state: &AppState, project: &str, name: &str) -> Result<Image, ApiError> {
    let value = state.store.get(ImageSpec::KIND, project, name).await?.ok_or_else(|| ApiError::NotFound {
        kind: ImageSpec::KIND.into(),
        project: project.to_string(),
        name: name.to_string(),
    })?;
    Ok(serde_json::from_value(value)?)
}

/// What an upload stored.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    sha256: String,
    size_bytes: u64,
}

async fn upload(
    State(state): State<SharedState>,
    Path((project, name)): Path<(String, String)>,
    body: Body,
) -> Result<axum::Json<Stored>, ApiError> {
    let dir = blob_dir(&state)?.to_path_buf();
    let image = image(&state, &project, &name).await?;
    let Some(want) = image.spec.sha256.clone() else {
        return Err(ApiError::Refused {
            message: format!("Image {project}/{name} names no sha256 to check the upload against"),
            suggestion: "set spec.sha256 (sha256sum of the file) first; nexusctl image import does".into(),
        });
    };
    tokio::fs::create_dir_all(dir.join("sha256"))
        .await
        .map_err(|e| ApiError::Internal(format!("creating the blob directory: {e}")))?;
    let io = |e: std::io::Error| ApiError::Internal(format!("storing the upload: {e}"));
    let partial = dir.join("sha256").join(format!(".{want}.{}.partial", uuid::Uuid::new_v4()));
    let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    let written: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("the upload was cut short: {e}")))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)
    }
    .await;
    let got = hex::encode(hasher.finalize());
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    if let Some(expected) = image.spec.size_bytes
        && expected != size
    {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ApiError::Refused {
            message: format!("the upload is {size} bytes, but Image {project}/{name} says {expected}"),
            suggestion: "upload the file the Image describes, or correct spec.sizeBytes".into(),
        });
    }
    if got != want {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ApiError::Refused {
            message: format!("the upload's sha256 is {got}, but Image {project}/{name} names {want}"),
            suggestion: "upload the file the Image describes, or correct spec.sha256".into(),
        });
    }
    tokio::fs::rename(&partial, blob_path(&dir, &want)).await.map_err(io)?;
    tracing::info!(project, image = name, sha256 = want, size, "image file stored");
    Ok(axum::Json(Stored { sha256: want, size_bytes: size }))
}

async fn download(
    State(state): State<SharedState>,
    Path((project, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let dir = blob_dir(&state)?;
    let image = image(&state, &project, &name).await?;
    let missing = || ApiError::Refused {
        message: format!("Image {project}/{name} has no file in the apiserver"),
        suggestion: "upload it: nexusctl image import".into(),
    };
    let sha256 = image.spec.sha256.clone().ok_or_else(missing)?;
    let file = match tokio::fs::File::open(blob_path(dir, &sha256)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(ApiError::Internal(format!("reading the image file: {e}"))),
    };
    let size = file.metadata().await.map_err(|e| ApiError::Internal(e.to_string()))?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (header::ETAG, format!("\"sha256:{sha256}\"")),
        ],
        body,
    )
        .into_response())
}
