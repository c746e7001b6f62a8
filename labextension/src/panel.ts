/**
 * The body of "Share with collaborators…": make a link, copy it, see who has access and
 * revoke. Plain DOM in a Lumino widget: the dialog is small and lives a few seconds.
 */
import { Clipboard } from '@jupyterlab/apputils';
import { Time } from '@jupyterlab/coreutils';
import { Widget } from '@lumino/widgets';

import {
  absolute,
  access,
  createCode,
  IAccess,
  ICode,
  IShare,
  revokeCode,
  revokeShare,
  SharingError
} from './api';

/** The expiries offered; the hub accepts one minute to one year. */
export const EXPIRIES: [string, number][] = [
  ['1 hour', 3600],
  ['1 day', 86400],
  ['1 week', 7 * 86400],
  ['30 days', 30 * 86400]
];
const DEFAULT_EXPIRY = 86400;

function element<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  className: string,
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

const UNITS: [Intl.RelativeTimeFormatUnit, number][] = [
  ['year', 365 * 86400_000],
  ['month', 30 * 86400_000],
  ['week', 7 * 86400_000],
  ['day', 86400_000],
  ['hour', 3600_000],
  ['minute', 60_000],
  ['second', 1000]
];

/** "in 1 hour", "tomorrow", "5 minutes ago" (Time.formatHuman rounds a future date
 * up to the largest unit: a day ahead would read "next year"). */
export function when(iso: string | null, now = Date.now()): string {
  if (!iso) {
    return 'never';
  }
  const delta = new Date(iso).getTime() - now;
  const format = new Intl.RelativeTimeFormat(document.documentElement.lang || 'en', {
    numeric: 'auto'
  });
  // The largest unit that counts at least one: a link made for a day "expires tomorrow".
  for (const [unit, ms] of UNITS) {
    if (Math.round(Math.abs(delta) / ms) >= 1 || unit === 'second') {
      return format.format(Math.round(delta / ms), unit);
    }
  }
  return '';
}

function exact(iso: string | null): string {
  return iso ? Time.format(new Date(iso)) : '';
}

export class SharePanel extends Widget {
  /**
   * @param path the open document's path, where the link lands (null: the server)
   * @param hubHost PageConfig's hubHost ('' when the hub shares this page's origin)
   */
  constructor(
    readonly path: string | null,
    readonly hubHost: string
  ) {
    super();
    this.addClass('jp-PresenceShare');
    const node = this.node;

    const make = element('div', 'jp-PresenceShare-make');
    const label = element('label', '', 'Link valid for ');
    this._expiry = element('select', 'jp-PresenceShare-expiry');
    for (const [text, seconds] of EXPIRIES) {
      const option = element('option', '', text);
      option.value = String(seconds);
      option.selected = seconds === DEFAULT_EXPIRY;
      this._expiry.appendChild(option);
    }
    label.appendChild(this._expiry);
    this._create = element('button', 'jp-mod-styled jp-mod-accept', 'Create link');
    this._create.addEventListener('click', () => void this.create());
    make.append(label, this._create);

    this._link = element('div', 'jp-PresenceShare-link');
    this._link.hidden = true;
    this._url = element('input', 'jp-PresenceShare-url');
    this._url.readOnly = true;
    this._copy = element('button', 'jp-mod-styled', 'Copy');
    this._copy.addEventListener('click', () => this.copy());
    this._note = element('p', 'jp-PresenceShare-note');
    this._link.append(this._url, this._copy, this._note);

    this._error = element('p', 'jp-PresenceShare-error');
    this._error.hidden = true;
    this._error.setAttribute('role', 'alert');
    this._warning = element('p', 'jp-PresenceShare-warning');
    this._warning.hidden = true;

    const heading = element('h3', 'jp-PresenceShare-heading', 'Who has access');
    this._who = element('ul', 'jp-PresenceShare-who');
    const intro = element(
      'p',
      'jp-PresenceShare-intro',
      'Anyone who opens the link and logs in to this hub can use this server as you do ' +
        '(open and edit files, run code), until you revoke them here; a link lets ' +
        'people in (again) until it expires or you revoke it.'
    );
    node.append(intro, make, this._link, this._error, heading, this._warning, this._who);
    void this.refresh();
  }

  /** Creates a link with the chosen expiry and shows it. */
  async create(): Promise<void> {
    this._create.disabled = true;
    try {
      const made = await createCode(Number(this._expiry.value), this.path);
      this._url.value = absolute(made.accept_url, this.hubHost);
      this._note.textContent =
        `Works until ${exact(made.expires_at)} (${when(made.expires_at)}), for everyone ` +
        'who has it. ' +
        (this.path
          ? `After accepting, collaborators land in ${this.path}.`
          : 'After accepting, collaborators land in this server.') +
        ' After it expires the hub answers "Share not found or expired": make a new link.' +
        " (The hub refuses your own link: try it from another account.)";
      this._link.hidden = false;
      this._url.select();
      this.showError(null);
      await this.refresh();
    } catch (error) {
      this.showError(error);
    } finally {
      this._create.disabled = false;
    }
  }

  copy(): void {
    Clipboard.copyToSystem(this._url.value);
    this._copy.textContent = 'Copied';
    window.setTimeout(() => (this._copy.textContent = 'Copy'), 2000);
  }

  /** Reads the server's shares and links again. */
  async refresh(): Promise<IAccess | null> {
    let state: IAccess;
    try {
      state = await access();
    } catch (error) {
      this.showError(error);
      this._create.disabled = true;
      this._who.replaceChildren();
      return null;
    }
    const rows: HTMLElement[] = [];
    for (const share of state.shares) {
      rows.push(this.shareRow(share));
    }
    for (const code of state.codes) {
      rows.push(this.codeRow(code));
    }
    if (!rows.length) {
      rows.push(element('li', 'jp-PresenceShare-nobody', 'Only you.'));
    }
    this._who.replaceChildren(...rows);
    return state;
  }

  private shareRow(share: IShare): HTMLElement {
    const row = element('li', 'jp-PresenceShare-share');
    row.dataset.kind = share.kind;
    row.dataset.name = share.name;
    const what = share.scopes.every(s => s.startsWith('access:servers'))
      ? 'uses this server'
      : share.scopes.join(', ');
    const text = element(
      'span',
      'jp-PresenceShare-what',
      `${share.kind === 'group' ? 'Group ' : ''}${share.name} ${what}, since ` +
        when(share.created_at)
    );
    text.title = exact(share.created_at);
    row.append(
      text,
      this.revokeButton(`Revoke ${share.name}`, () => revokeShare(share), state => {
        // The hub lets a link be used again: whoever was revoked could come back.
        this._warning.hidden = !state?.codes.length;
        this._warning.textContent =
          `${share.name} is out. A link that is still valid would let them back in: ` +
          'revoke the links below to stop that.';
      })
    );
    return row;
  }

  private codeRow(code: ICode): HTMLElement {
    const row = element('li', 'jp-PresenceShare-code');
    row.dataset.id = code.id;
    const used =
      code.exchange_count === 0
        ? 'not used yet'
        : code.exchange_count === 1
          ? 'used once'
          : `used ${code.exchange_count} times`;
    const text = element(
      'span',
      'jp-PresenceShare-what',
      `A link made ${when(code.created_at)}, ${used}, expires ${when(code.expires_at)}`
    );
    text.title = `expires ${exact(code.expires_at)}`;
    row.append(
      text,
      this.revokeButton(
        'Revoke link',
        () => revokeCode(code.id),
        state => (this._warning.hidden = this._warning.hidden || !state?.codes.length)
      )
    );
    return row;
  }

  private revokeButton(
    caption: string,
    revoke: () => Promise<void>,
    after: (state: IAccess | null) => void
  ): HTMLElement {
    const button = element('button', 'jp-mod-styled jp-mod-warn', 'Revoke');
    button.title = caption;
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        await revoke();
        this.showError(null);
      } catch (error) {
        this.showError(error);
      }
      after(await this.refresh());
    });
    return button;
  }

  private showError(error: unknown): void {
    if (error === null) {
      this._error.hidden = true;
      this._error.textContent = '';
      return;
    }
    this._error.hidden = false;
    this._error.dataset.reason = error instanceof SharingError ? error.reason : 'error';
    this._error.textContent =
      error instanceof SharingError ? error.message : `Sharing failed: ${String(error)}`;
  }

  private _expiry: HTMLSelectElement;
  private _create: HTMLButtonElement;
  private _link: HTMLDivElement;
  private _url: HTMLInputElement;
  private _copy: HTMLButtonElement;
  private _note: HTMLParagraphElement;
  private _error: HTMLParagraphElement;
  private _warning: HTMLParagraphElement;
  private _who: HTMLUListElement;
}
