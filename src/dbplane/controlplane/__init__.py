"""The controller: reconcilers that turn database specs into placed, running members."""
