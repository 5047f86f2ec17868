//! Which images each tenant sees.
//!
//! The runner keeps one image store; the control plane records which tenant owns each image made by a tenant other
//! than `default` (by snapshot, import, pull or tag). An image without an owner belongs to the catalogue that every
//! tenant sees and the `default` tenant keeps (the base image, and what the operator's tenant makes). A tenant sees
//! the catalogue and its own images; another tenant's are "not found", exactly as a missing one. Names are one
//! namespace: a tenant cannot take a name another holds (the refusal says only that the name is taken).

use axum::http::StatusCode;
use nook_api::tenancy::DEFAULT_TENANT;
use nook_api::Image;
use nook_runner::images::ImageError;
use nook_runner::RunnerError;

use crate::control::Control;
use crate::error::ApiFailure;
use crate::tenancy::current_tenant;

/// Whether an image with `owner` is visible to `tenant`.
fn visible(owner: Option<&str>, tenant: &str) -> bool {
    owner.is_none_or(|owner| owner == tenant)
}

/// The answer for an image the caller may not see: the runner's own "not found".
fn not_found(name: &str) -> ApiFailure {
    ApiFailure::from(RunnerError::Image(ImageError::NotFound(name.to_string())))
}

impl Control {
    /// The image named `name`, if the caller's tenant sees it.
    pub async fn image(&self, name: &str) -> Result<Image, ApiFailure> {
        let owner = self.store().image_owner(name).await?;
        if !visible(owner.as_deref(), &current_tenant()) {
            return Err(not_found(name));
        }
        Ok(self.runner().image(name).await?)
    }

    /// The images the caller's tenant sees.
    pub async fn images(&self) -> Result<Vec<Image>, ApiFailure> {
        let owners = self.store().image_owners().await?;
        let tenant = current_tenant();
        Ok(self
            .runner()
            .list_images()
            .await?
            .into_iter()
            .filter(|image| visible(owners.get(&image.name).map(String::as_str), &tenant))
            .collect())
    }

    /// Checks that the caller's tenant may make (or replace) an image named `name`.
    pub async fn claim_image_name(&self, name: &str) -> Result<(), ApiFailure> {
        let tenant = current_tenant();
        let owner = self.store().image_owner(name).await?;
        let taken = || {
            Err(ApiFailure::new(
                StatusCode::CONFLICT,
                "name_taken",
                format!("the image name {name:?} is taken; choose another"),
            ))
        };
        match owner {
            Some(owner) if owner == tenant => Ok(()),
            Some(_) => taken(),
            // The catalogue is the default tenant's to change.
            None if tenant == DEFAULT_TENANT => Ok(()),
            None => match self.runner().image(name).await {
                Ok(_) => taken(),
                Err(RunnerError::Image(ImageError::NotFound(_))) => Ok(()),
                Err(error) => Err(error.into()),
            },
        }
    }

    /// Records that `tenant` made the image `name` (the default tenant's join the catalogue).
    pub async fn record_image(&self, name: &str, tenant: &str) -> Result<(), ApiFailure> {
        if tenant != DEFAULT_TENANT {
            self.store().set_image_owner(name, tenant).await?;
        }
        Ok(())
    }

    /// Forgets the owners of images that no longer exist (after a prune).
    pub async fn forget_missing_images(&self) -> Result<(), ApiFailure> {
        let present: std::collections::HashSet<String> = self
            .runner()
            .list_images()
            .await?
            .into_iter()
            .map(|image| image.name)
            .collect();
        for name in self.store().image_owners().await?.into_keys() {
            if !present.contains(&name) {
                self.store().remove_image_owner(&name).await?;
            }
        }
        Ok(())
    }

    /// Removes an image the caller's tenant owns (catalogue images: the default tenant only).
    pub async fn remove_image(&self, name: &str) -> Result<(), ApiFailure> {
        let tenant = current_tenant();
        let owner = self.store().image_owner(name).await?;
        if !visible(owner.as_deref(), &tenant) {
            return Err(not_found(name));
        }
        if owner.is_none() && tenant != DEFAULT_TENANT {
            return Err(ApiFailure::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{name} is in the shared catalogue, which the {DEFAULT_TENANT} tenant keeps"),
            ));
        }
        self.runner().remove_image(name).await?;
        self.store().remove_image_owner(name).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_see_the_catalogue_and_their_own() {
        assert!(visible(None, "acme"));
        assert!(visible(Some("acme"), "acme"));
        assert!(!visible(Some("globex"), "acme"));
    }
}
