"""Starting and stopping a whole platform on one machine (`dbplane up` / `dbplane down`)."""
