/**
 * "Share with collaborators…" for JupyterLab on a JupyterHub: a share link that lands
 * the collaborator in the open notebook, who has access, and revoke.
 *
 * Active only in the owner's page of a JupyterHub single-user server where presence's
 * server extension runs (it marks those pages: presence/jupyter/sharing.py); elsewhere
 * it adds nothing.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, ICommandPalette, showDialog } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { DocumentWidget } from '@jupyterlab/docregistry';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { Menu } from '@lumino/widgets';

import { SharePanel } from './panel';

export const COMMAND = 'presence:share';
const MENU_ID = 'jp-mainmenu-share';

/** Whether this page is its owner's JupyterLab on a hub (hubUser cannot tell: it is
 * the name the user is shown under, an anonymous one where presence makes them). */
export function ownerOnHub(): boolean {
  return (
    PageConfig.getOption('hubPrefix') !== '' &&
    String(PageConfig.getOption('presenceShare')) === 'true'
  );
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: '@presence-awareness/jupyterlab:share',
  description: 'Share this JupyterHub server: share links, who has access, revoke.',
  autoStart: true,
  optional: [ILabShell, IMainMenu, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    mainMenu: IMainMenu | null,
    palette: ICommandPalette | null
  ) => {
    if (!ownerOnHub()) {
      return;
    }
    app.commands.addCommand(COMMAND, {
      label: 'Share with collaborators…',
      caption: 'Make a link that lets others use this server; see who has access; revoke',
      execute: () => {
        const current = labShell?.currentWidget ?? app.shell.currentWidget;
        const path = current instanceof DocumentWidget ? current.context.path : null;
        const panel = new SharePanel(path, PageConfig.getOption('hubHost'));
        return showDialog({
          title: 'Share with collaborators',
          body: panel,
          buttons: [Dialog.okButton({ label: 'Close' })]
        });
      }
    });
    palette?.addItem({ command: COMMAND, category: 'Share' });
    if (mainMenu) {
      const menu = new Menu({ commands: app.commands });
      menu.id = MENU_ID;
      menu.title.label = 'Share';
      menu.addItem({ command: COMMAND });
      mainMenu.addMenu(menu, true, { rank: 600 });
    }
  }
};

export default plugin;
